"""A real Airflow deployment for end-to-end tests: scheduler, dag-processor, API server (and a Celery
worker) as separate processes on 127.0.0.1, driven through the REST API.

Each process runs in its own process group and is ended by its id when the stack stops. The admin
password is written before start (SimpleAuthManager keeps an existing passwords file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence
from urllib.parse import quote

import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "m2f-admin-test-password"
TERMINAL_RUN_STATES = ("success", "failed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(command: List[str]) -> bool:
    """Whether ``command`` (a client such as pg_isready or redis-cli) is installed and succeeds."""
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True, timeout=20).returncode == 0


@contextlib.contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[Optional[str]]:
    """A new database on the PostgreSQL server of 127.0.0.1:5432 (user ``postgres``, trust authentication), as
    a SQLAlchemy URL, dropped afterwards; None when no server answers there."""
    if not reachable(["pg_isready", "-h", "127.0.0.1", "-U", "postgres"]):
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c"]
    subprocess.run(psql + [f"CREATE DATABASE {name}"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        subprocess.run(psql + [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True)


class AirflowStack:
    """Airflow processes sharing one AIRFLOW_HOME and metadata database."""

    def __init__(self, home: Path, *, sql_alchemy_conn: Optional[str] = None, executor: str = "LocalExecutor",
                 extra_env: Optional[Dict[str, str]] = None, celery_queues: Optional[str] = None,
                 triggerer: bool = False, setup: Sequence[Sequence[str]] = ()):
        self.home = home
        #: airflow CLI commands run after the metadata database is migrated, before the processes start
        self.setup = [tuple(command) for command in setup]
        self.with_triggerer = triggerer
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.celery_queues = celery_queues
        self.processes: Dict[str, subprocess.Popen] = {}
        self._token: Optional[str] = None
        home.mkdir(parents=True, exist_ok=True)
        (home / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": str(home),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": "m2f-test-jwt-secret-shared-by-all-processes",
            "AIRFLOW__API__SECRET_KEY": "m2f-test-api-secret",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn or f"sqlite:///{home / 'airflow.db'}?timeout=60",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            **(extra_env or {}),
        }

    # ------------------------------------------------------------------------------- processes

    def airflow(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run an ``airflow`` CLI command against this stack's configuration."""
        done = subprocess.run([str(VENV_BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`airflow {' '.join(args[:3])} ...` exited with {done.returncode}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def backfill(self, dag_id: str, from_date: str, to_date: str, conf: Dict[str, Any], attempts: int = 8) -> str:
        """``airflow backfill create``; retried when SQLite reports a lock (Airflow then removes the partial
        backfill so that it can be created again)."""
        args = ("backfill", "create", "--dag-id", dag_id, "--from-date", from_date, "--to-date", to_date,
                "--max-active-runs", "1", "--dag-run-conf", json.dumps(conf))
        for attempt in range(1, attempts + 1):
            done = self.airflow(*args, check=False)
            if done.returncode == 0:
                return done.stdout + done.stderr
            if "database is locked" not in done.stdout + done.stderr or attempt == attempts:
                raise RuntimeError(f"airflow backfill create exited with {done.returncode}:\n{done.stderr[-3000:]}")
            time.sleep(2)
        raise AssertionError("unreachable")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen([str(VENV_BIN / "airflow"), *args], env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)

    def start(self, timeout: float = 180) -> "AirflowStack":
        self.airflow("db", "migrate", timeout=600)
        # AutoML trials run in this pool; a scheduler never queues tasks of a pool that does not exist.
        self.airflow("pools", "set", "mask2former_gpu", "2", "Mask2Former training slots (GPUs)")
        for command in self.setup:
            self.airflow(*command)
        self._spawn("api-server", "api-server", "--port", str(self.port), "--host", "127.0.0.1", "--workers", "1")
        self._spawn("scheduler", "scheduler")
        self._spawn("dag-processor", "dag-processor")
        if self.celery_queues:
            self._spawn("celery-worker", "celery", "worker", "--queues", self.celery_queues, "--concurrency", "2")
        if self.with_triggerer:
            self._spawn("triggerer", "triggerer")
        self.wait_healthy(timeout)
        return self

    def kill(self, *names: str) -> None:
        """SIGKILL processes (and their process groups: a LocalExecutor's task processes die with the scheduler),
        as a crashed machine or a deploy would."""
        for name in names:
            os.killpg(self.processes[name].pid, signal.SIGKILL)
            self.processes[name].wait(timeout=30)

    def restart(self, *names: str) -> None:
        """Start killed processes again (their logs continue in <name>.out)."""
        for name in names:
            args = {"scheduler": ("scheduler",), "triggerer": ("triggerer",), "dag-processor": ("dag-processor",)}[name]
            log = open(self.home / f"{name}.out", "a")
            self.processes[name] = subprocess.Popen([str(VENV_BIN / "airflow"), *args], env=self.env, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
                last = health
                if health["metadatabase"]["status"] == "healthy" and health["scheduler"]["status"] == "healthy":
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Airflow at {self.base_url} not healthy after {timeout} s: {last}\n{self.tail_logs()}")

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {process.returncode}:\n{self.tail_logs()}")

    def tail_logs(self, lines: int = 30) -> str:
        out = []
        for name in self.processes:
            path = self.home / f"{name}.out"
            if path.is_file():
                out.append(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    # -------------------------------------------------------------------------------- REST API

    def token(self) -> str:
        if self._token is None:
            reply = requests.post(f"{self.base_url}/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD},
                                  timeout=30)
            reply.raise_for_status()
            self._token = reply.json()["access_token"]
        return self._token

    def login(self, username: str, password: str) -> str:
        """A JWT of another user (the auth manager's token endpoint)."""
        reply = requests.post(f"{self.base_url}/auth/token", json={"username": username, "password": password},
                              timeout=30)
        assert reply.status_code in (200, 201), reply.text
        return reply.json()["access_token"]

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.base_url}{path}", headers=headers, timeout=60, **kwargs)

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.api("GET", f"/api/v2/dags/{dag_id}").status_code == 200:
                return
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout} s\n{self.tail_logs()}")

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def trigger(self, dag_id: str, conf: Dict[str, Any]) -> str:
        reply = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert reply.status_code == 200, reply.text
        return reply.json()["dag_run_id"]

    def runs(self, dag_id: str) -> List[Dict[str, Any]]:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100})
        reply.raise_for_status()
        return reply.json()["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()["state"]
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(2)
        raise TimeoutError(f"run {run_id} of {dag_id} still {state} after {timeout} s: "
                           f"{self.task_states(dag_id, run_id)}\n{self.tail_logs()}")

    def task_instances(self, dag_id: str, run_id: str) -> Dict[str, Dict[str, Any]]:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")
        reply.raise_for_status()
        return {ti["task_id"]: ti for ti in reply.json()["task_instances"]}

    def task_states(self, dag_id: str, run_id: str) -> Dict[str, Optional[str]]:
        return {task: ti["state"] for task, ti in self.task_instances(dag_id, run_id).items()}

    def mapped_task_instances(self, dag_id: str, run_id: str, task_id: str) -> List[Dict[str, Any]]:
        """Every map index of a mapped task (``task_instances`` keeps one per task id), by map index."""
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/"
                                f"listMapped", params={"limit": 100})
        reply.raise_for_status()
        return sorted(reply.json()["task_instances"], key=lambda ti: ti["map_index"])

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str, *, downstream: bool = False) -> None:
        """Mark a task instance (and, with ``downstream``, every task after it) success, failed or skipped,
        as the UI's "Mark as" does; the scheduler then never runs a task marked before it started."""
        reply = self.api("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}",
                         json={"new_state": state, "include_downstream": downstream})
        assert reply.status_code == 200, reply.text

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/"
                                f"xcomEntries/{key}", params={"deserialize": "true", "stringify": "false",
                                                              "map_index": map_index})
        assert reply.status_code == 200, reply.text
        return reply.json()["value"]

    def links(self, dag_id: str, run_id: str, task_id: str) -> Dict[str, Optional[str]]:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/links")
        reply.raise_for_status()
        return reply.json()["extra_links"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's log files (LocalExecutor/Celery on this machine write them under AIRFLOW_HOME/logs), with the
        triggerer's part of a deferred task (``attempt=N.log.trigger.<triggerer id>.log``)."""
        found = sorted((self.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/"
                                                 f"attempt={try_number}.log*"))
        return "\n".join(p.read_text(errors="replace") for p in found)
