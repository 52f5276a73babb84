"""The job entry point, ``python -m operators.pod_job``: the command of a Kubernetes pod, and of the local
process a non-pod launcher starts (a child of the task, or detached from it for a deferrable task).

It reads its :class:`~operators.utils.jobs.JobDescription` from ``MASK2FORMER_JOB`` and, through the
storage hook's operations without Airflow (:class:`~operators.hooks.object_store.JobStore`) and with the
process's own credentials (its environment: a Kubernetes Secret, IRSA, or the worker's connection handed
over at launch):

1. restores an earlier attempt's checkpoints (train on an S3 root), stages the data, writes ``spec.yaml``;
2. runs ``python -m mask2former ACTION -e spec.yaml --results-dir DIR`` in its own process group;
3. every ``check_interval`` seconds: a heartbeat (``_HEARTBEAT``), status.json uploaded when the folder is
   published elsewhere (its new lines also go to this process's output), and a look for a stop request
   (``_STOP``), which ends the engine (SIGTERM, then SIGKILL); so does SIGTERM to this process;
4. makes sure status.json ends with SUCCESS or FAILURE, records the exit status in the last heartbeat and
   publishes the folder (``_FINISHED`` last). Exits with the engine's status.

The engine gets no cloud credentials: its data are local paths by then.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

from mask2former import results
from mask2former.data.sources import join_uri, local_path_of, uri_scheme
from mask2former.processes import terminate_process_group

from .hooks.object_store import JobStore, ObjectStore
from .utils.jobs import JOB_ENV, JobDescription, process_env

SPEC_FILE = "spec.yaml"
#: Values the engine fetches itself (pretrained weights by URL); staging takes s3:// and file:// only.
ENGINE_FETCHED_SCHEMES = ("http://", "https://")
#: Never handed to the engine: connections, variables, cloud credentials, Airflow's own settings.
SECRET_ENV_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__", "AWS_")
#: The CLI's exit status for an invalid spec or command line: retrying cannot help.
EXIT_USAGE = 2
EXIT_FAILED = 1
KILL_GRACE_S = 20.0
FINAL_STATUSES = ("SUCCESS", "FAILURE")
#: Starts the line that gives the engine's exit status and its seconds (read by bench/bench_operators.py).
ENGINE_ENDED = "engine ended with exit status"

Log = Callable[[str], None]


def engine_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The engine's environment: this process's without secrets; the encryption key
    (MASK2FORMER_ENCRYPTION_KEY) is the only one that passes."""
    return process_env(os.environ if base is None else base, drop=SECRET_ENV_PREFIXES)


#: Linux's prctl, looked up before any fork (a child between fork and exec must take no lock).
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """In the engine's process: SIGTERM it when this job process dies, so no engine outlives the process
    that publishes it."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def nested(overrides: Dict) -> Dict:
    """Dotted keys as the nested sections of a spec file."""
    tree: Dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


class JobProcess:
    """One job, run to its end (see the module docstring); :meth:`stop` may come from another thread."""

    def __init__(self, job: JobDescription, hook: ObjectStore, log: Log, python: Optional[str] = None):
        self.job = job
        self.hook = hook
        self.log = log
        self.python = python or sys.executable
        self.folder = Path(job.local_dir)
        #: Published elsewhere than where it runs (S3): status.json is uploaded while the job runs.
        self.remote = uri_scheme(job.publish_uri) == "s3" or \
            Path(local_path_of(job.publish_uri)).resolve() != self.folder.resolve()
        self.stop_reason: Optional[str] = None
        self._engine: Optional[subprocess.Popen] = None
        self._done = threading.Event()
        self._uploaded = -1

    def run(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        monitor = threading.Thread(target=self._monitor, name="job-monitor", daemon=True)
        self._safe_tick()
        monitor.start()
        try:
            code = self._prepare_and_run()
        finally:
            self._done.set()
            monitor.join(timeout=60)
        self._finish(code)
        return code

    def _prepare_and_run(self) -> int:
        job = self.job
        try:
            if job.action == "train":
                self.hook.restore(job.publish_uri, self.folder, self.log)
            by_url = {k: v for k, v in job.overrides.items()
                      if isinstance(v, str) and v.lower().startswith(ENGINE_FETCHED_SCHEMES)}
            staged = self.hook.stage({k: v for k, v in job.overrides.items() if k not in by_url},
                                     Path(job.cache_dir), log=self.log)
            spec = nested({**staged.local_overrides, **by_url})
            results.atomic_write_text(self.folder / SPEC_FILE, yaml.safe_dump(spec, sort_keys=False))
        except Exception as error:  # noqa: BLE001 - the job's status must say why it never started
            results.StatusWriter(self.folder).failure(f"{job.action} could not start: {type(error).__name__}: {error}")
            self.log(f"{job.action} job {job.job_id} could not start: {error}")
            return EXIT_FAILED
        if self.stop_reason:
            results.StatusWriter(self.folder).failure(f"{job.action} stopped before it started: {self.stop_reason}")
            return EXIT_FAILED
        command = [self.python, "-m", "mask2former", job.action, "-e", str(self.folder / SPEC_FILE), "--results-dir",
                   str(self.folder)]
        began = time.monotonic()
        self._engine = subprocess.Popen(command, cwd=self.folder, env=engine_env(), start_new_session=True,
                                        preexec_fn=_end_with_parent)
        self.log(f"launched `python {' '.join(command[1:])}` as pid {self._engine.pid}")
        if self.stop_reason:  # a stop that came while the engine was being started
            self.stop(self.stop_reason)
        code = self._engine.wait()
        self.log(f"{ENGINE_ENDED} {code} after {time.monotonic() - began:.2f} s")
        return code

    def stop(self, reason: str) -> None:
        """End the engine (SIGTERM to its group, SIGKILL after a grace period); the job then publishes."""
        self.stop_reason = self.stop_reason or reason
        self.log(f"stopping {self.job.action} job {self.job.job_id}: {reason}")
        if self._engine is not None:
            threading.Thread(target=terminate_process_group, args=(self._engine, KILL_GRACE_S), daemon=True).start()

    def _monitor(self) -> None:
        while not self._done.wait(self.job.check_interval):
            self._safe_tick()

    def _safe_tick(self) -> None:
        """A tick, then a look for a stop request; a storage hiccup must not end the job (the next tick retries)."""
        try:
            self._tick()
            reason = None if self.stop_reason else self.hook.stop_requested(self.job.publish_uri)
            if reason:
                self.stop(reason)
        except Exception as error:  # noqa: BLE001
            self.log(f"job monitor: {type(error).__name__}: {error}")

    def _tick(self, **extra: object) -> None:
        """Heartbeat, and status.json uploaded when published elsewhere. Its lines are not echoed: the engine prints
        each progress line itself, into the same output (a trigger following a detached job streams them)."""
        status = self.folder / results.STATUS_FILE
        if self.remote and status.is_file() and status.stat().st_size != self._uploaded:
            size = status.stat().st_size
            self.hook.upload_file(status, join_uri(self.job.publish_uri, results.STATUS_FILE))
            self._uploaded = size
        self.hook.beat(self.job.publish_uri, host=socket.gethostname(), pid=os.getpid(), **extra)

    def _finish(self, code: int) -> None:
        last = results.read_status(self.folder)
        if not last or last[-1].get("status") not in FINAL_STATUSES or (self.stop_reason and code != 0):
            ended = f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else \
                f"ended with exit status {code}"
            why = f"stopped: {self.stop_reason}" if self.stop_reason else \
                f"the engine {ended} before writing its final status"
            results.StatusWriter(self.folder).failure(f"{self.job.action} {why}")
        try:
            self._tick(exit_code=code, stop_reason=self.stop_reason)
        except Exception as error:  # noqa: BLE001 - publishing matters more than the last beat
            self.log(f"job monitor: {type(error).__name__}: {error}")
        self.hook.publish(self.folder, self.job.publish_uri, log=self.log)


def _print(message: str) -> None:
    """The job's own lines, plain on stdout: the task log (a child job), job.log (a detached one) or the pod's log
    time-stamps them."""
    print(message, flush=True)


def main(argv: Optional[List[str]] = None) -> int:  # noqa: ARG001 - entry point
    log = _print
    raw = os.environ.get(JOB_ENV)
    if not raw:
        print(f"error: {JOB_ENV} is not set (the launcher passes the job in it)", file=sys.stderr)
        return EXIT_USAGE
    process = JobProcess(JobDescription.from_json(raw), JobStore(), log)
    signal.signal(signal.SIGTERM, lambda signum, frame: process.stop(f"received {signal.Signals(signum).name}"))
    code = process.run()
    return code if code >= 0 else 128 - code  # an engine killed by a signal, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
