"""How an operator runs the engine: a local subprocess, or a Kubernetes pod for GPU stages.

Both run the same command, ``python -m mask2former ACTION -e spec.yaml --results-dir DIR``, on a job
whose overrides were validated by the operator. A launcher's ``run`` returns the folder to read the
job's outcome from (the local job folder; for a pod, ``None``: read the published S3 folder) and raises
:class:`AirflowException` when the job failed or was killed.

The encryption key of a job (:mod:`operators.encryption`) reaches the engine only as the environment
variable MASK2FORMER_ENCRYPTION_KEY: of the subprocess for a local job (``JobRequest.encryption_key``), and
from a Kubernetes Secret for a pod (``encryption_key_secret_name``), never as a literal in the pod spec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from mask2former import results
from mask2former.processes import terminate_process_group

from .encryption import KEY_ENV
from .jobs import JobPaths
from .pod_job import POD_JOB_ENV, POD_WORKSPACE_ENV
from .prepare import cli_command, publish, stage_and_write_spec
from .remote import restore_job_folder

Log = Callable[[str], None]

#: Environment variables never handed to the engine: connections, variables, cloud credentials and
#: Airflow's own settings (database URLs, secret keys). The engine sees local paths only.
_SECRET_ENV_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__", "AWS_")
#: The CLI's exit status for an invalid spec or command line: retrying cannot help.
EXIT_USAGE = 2


@dataclass
class JobRequest:
    """One job: the action, its validated (unstaged) overrides, where it runs and publishes."""

    action: str
    overrides: Dict[str, Any]
    paths: JobPaths
    cache_dir: Path
    s3_client_factory: Callable[[], Any]
    log: Log
    context: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)
    #: The key that opens and seals the job's models (from the operator's connection or Variable); handed to
    #: the engine through its environment only, and left out of repr() so it never lands in a log line.
    encryption_key: Optional[str] = field(default=None, repr=False)


def engine_env(base: Optional[Dict[str, str]] = None, *, encryption_key: Optional[str] = None) -> Dict[str, str]:
    """The subprocess environment: ``base`` without secrets, the engine's folder on PYTHONPATH, and
    MASK2FORMER_ENCRYPTION_KEY set to ``encryption_key`` when one is given. A key in the worker's own
    environment is never passed on: a job's key comes from its operator's connection or Variable."""
    import mask2former

    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(_SECRET_ENV_PREFIXES) and k != KEY_ENV}
    if encryption_key:
        env[KEY_ENV] = encryption_key
    engine_root = str(Path(mask2former.__file__).resolve().parents[1])
    paths = [engine_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != engine_root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_status(line: Dict[str, Any]) -> str:
    """One log line for a status.json line."""
    parts = [f"[{line.get('status', '?')}] {line.get('message', '')}"]
    if line.get("epoch") is not None:
        parts.append(f"epoch {line['epoch']}/{line.get('max_epoch', '?')}")
    if line.get("kpi"):
        parts.append("kpi " + json.dumps(line["kpi"], sort_keys=True))
    if line.get("eta"):
        parts.append(f"eta {line['eta']}")
    return "status.json: " + ", ".join(parts)


class StatusFollower:
    """Logs every new complete line of a job's status.json while the job runs (a daemon thread)."""

    def __init__(self, results_dir: Path, log: Log, poll_s: float = 1.0):
        self._path = Path(results_dir) / results.STATUS_FILE
        self._log = log
        self._poll_s = poll_s
        self._offset = self._path.stat().st_size if self._path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-follower", daemon=True)
        self.lines: List[Dict[str, Any]] = []

    def start(self) -> "StatusFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.poll()

    def poll(self) -> None:
        if not self._path.is_file():
            return
        with open(self._path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for raw in complete.decode(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            self.lines.append(line)
            self._log(describe_status(line))


class LocalProcessLauncher:
    """Runs the engine as a subprocess in its own process group on this worker.

    Data is staged by this process (through the Airflow connection's S3 client) so the engine sees
    local paths and no credentials. ``kill`` (from the operator's ``on_kill``) sets a flag and ends the
    whole process group; ``run`` then raises, so a killed job never ends as a success.
    """

    stages_locally = True
    #: The operator hands the key read from Airflow to this launcher (JobRequest.encryption_key).
    takes_encryption_key = True

    def __init__(self, *, python: Optional[str] = None, kill_grace_s: float = 10.0, status_poll_s: float = 1.0):
        self.python = python or sys.executable
        self.kill_grace_s = kill_grace_s
        self.status_poll_s = status_poll_s
        self._process: Optional[subprocess.Popen] = None
        self._killed = False

    def run(self, request: JobRequest) -> Path:
        paths, log = request.paths, request.log
        self._killed = False
        if paths.publishes_to_s3 and request.action == "train":
            restore_job_folder(paths.publish_uri, paths.local_dir, request.s3_client_factory, log)
        stage_and_write_spec(action=request.action, overrides=request.overrides, local_dir=paths.local_dir,
                             cache_dir=request.cache_dir, s3_client_factory=request.s3_client_factory, log=log)
        try:
            self._run_process(request)
        except BaseException:
            self._publish_failed(request)
            raise
        publish(local_dir=paths.local_dir, publish_uri=paths.publish_uri,
                s3_client_factory=request.s3_client_factory, log=log)
        return paths.local_dir

    def _run_process(self, request: JobRequest) -> None:
        folder, log = request.paths.local_dir, request.log
        command = cli_command(self.python, request.action, folder)
        if self._killed:
            raise AirflowException(f"{request.action} job {request.paths.job_id} was killed before it started.")
        follower = StatusFollower(folder, log, poll_s=self.status_poll_s).start()
        last_output = ""
        began = time.monotonic()
        try:
            self._process = subprocess.Popen(command, cwd=folder, env=engine_env(encryption_key=request.encryption_key),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            log(f"launched `python {' '.join(command[1:])}` as pid {self._process.pid} (own process group)")
            assert self._process.stdout is not None
            for raw in iter(self._process.stdout.readline, b""):
                text = raw.decode(errors="replace").rstrip("\n").split("\r")[-1].rstrip()
                if text:
                    last_output = text
                    log(f"{request.action}: {text}")
            returncode = self._process.wait()
        finally:
            follower.stop()
        seconds = time.monotonic() - began
        if self._killed:
            raise AirflowException(f"{request.action} job {request.paths.job_id} was killed (task stopped after "
                                   f"{seconds:.1f} s); its folder {folder} keeps the checkpoints written so far.")
        if returncode != 0:
            last = follower.lines[-1] if follower.lines else {}  # this attempt's lines only
            why = last.get("message") if last.get("status") == "FAILURE" else (last_output or "no output")
            signal_note = f" (killed by signal {-returncode})" if returncode < 0 else ""
            error = AirflowFailException if returncode == EXIT_USAGE else AirflowException
            raise error(f"{request.action} job {request.paths.job_id} failed with exit status "
                        f"{returncode}{signal_note}: {why}")
        log(f"{request.action} finished in {seconds:.1f} s")

    @staticmethod
    def _publish_failed(request: JobRequest) -> None:
        """Publish a failed job too (status and checkpoints for a retry elsewhere), never masking its error."""
        try:
            publish(local_dir=request.paths.local_dir, publish_uri=request.paths.publish_uri,
                    s3_client_factory=request.s3_client_factory, log=request.log)
        except Exception as exc:  # noqa: BLE001 - the job's own failure is the one to raise
            request.log(f"could not publish the failed job's folder {request.paths.local_dir}: "
                        f"{type(exc).__name__}: {exc}")

    def kill(self) -> None:
        """End the job's process group: SIGTERM, then SIGKILL after the grace period."""
        self._killed = True
        if self._process is not None:
            terminate_process_group(self._process, self.kill_grace_s)


POD_WORKSPACE = "/workspace"


class KubernetesPodLauncher:
    """Runs the job in a pod (GPU stages on a cluster) through the cncf-kubernetes provider's operator.

    The pod runs ``python -m operators.pod_job``: it stages the data from S3 itself, runs the same
    ``python -m mask2former ACTION -e spec.yaml`` command and publishes the folder to the job's S3
    results location, which must therefore be ``s3://``. S3 credentials reach the pod only through
    ``aws_secret_name`` (a Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for
    MinIO, AWS_ENDPOINT_URL) or the pod's service account (IRSA); never through the pod spec.

    The model encryption key likewise: ``encryption_key_secret_name`` names a Kubernetes Secret whose
    ``encryption_key_secret_key`` entry becomes the pod's MASK2FORMER_ENCRYPTION_KEY (a ``secretKeyRef``, so
    the pod spec holds a reference, not the key). Operators with a pod launcher therefore refuse
    ``encryption_key_conn_id`` / ``encryption_key_variable``.
    """

    stages_locally = False
    takes_encryption_key = False

    def __init__(self, *, image: str, namespace: str = "default", gpus: int = 1, cpu: Optional[str] = "4",
                 memory: Optional[str] = "16Gi", workspace_size: str = "50Gi",
                 service_account_name: Optional[str] = None, aws_secret_name: Optional[str] = None,
                 node_selector: Optional[Dict[str, str]] = None, kubernetes_conn_id: str = "kubernetes_default",
                 image_pull_policy: str = "IfNotPresent", startup_timeout_seconds: int = 600,
                 encryption_key_secret_name: Optional[str] = None, encryption_key_secret_key: str = KEY_ENV):
        if gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {gpus}")
        if not encryption_key_secret_key:
            raise ValueError("encryption_key_secret_key must name the entry of the Secret that holds the key.")
        self.image = image
        self.namespace = namespace
        self.gpus = gpus
        self.cpu = cpu
        self.memory = memory
        self.workspace_size = workspace_size
        self.service_account_name = service_account_name
        self.aws_secret_name = aws_secret_name
        self.node_selector = node_selector
        self.kubernetes_conn_id = kubernetes_conn_id
        self.image_pull_policy = image_pull_policy
        self.startup_timeout_seconds = startup_timeout_seconds
        self.encryption_key_secret_name = encryption_key_secret_name
        self.encryption_key_secret_key = encryption_key_secret_key
        self._pod_operator: Any = None

    def pod_job(self, request: JobRequest) -> Dict[str, Any]:
        """What the pod entry point receives (no credentials: URIs and spec keys only)."""
        return {"action": request.action, "job_id": request.paths.job_id, "overrides": request.overrides,
                "publish_uri": request.paths.publish_uri}

    def build_operator(self, request: JobRequest, task_id: str) -> Any:
        """The KubernetesPodOperator that runs ``request`` (built, not executed)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        if request.encryption_key:
            raise AirflowFailException("KubernetesPodLauncher takes the encryption key from a Kubernetes Secret "
                                       "(encryption_key_secret_name), never from the pod spec; remove the "
                                       "operator's encryption_key_conn_id / encryption_key_variable.")
        if not request.paths.publishes_to_s3:
            raise AirflowException(f"KubernetesPodLauncher needs an s3:// results_root (the pod publishes its "
                                   f"results there); got {request.paths.publish_uri}.")
        limits: Dict[str, str] = {}
        requests_: Dict[str, str] = {}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        if self.cpu:
            requests_["cpu"] = self.cpu
        if self.memory:
            requests_["memory"] = limits["memory"] = self.memory
        tolerations = [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] \
            if self.gpus else []
        env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=self.aws_secret_name))] \
            if self.aws_secret_name else []
        secret_env = [k8s.V1EnvVar(name=KEY_ENV, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
            name=self.encryption_key_secret_name, key=self.encryption_key_secret_key)))] \
            if self.encryption_key_secret_name else []
        return KubernetesPodOperator(
            task_id=task_id,
            name=f"mask2former-{request.action.replace('_', '-')}",
            namespace=self.namespace,
            image=self.image,
            image_pull_policy=self.image_pull_policy,
            cmds=["python", "-m", "operators.pod_job"],
            env_vars=[k8s.V1EnvVar(name=POD_JOB_ENV, value=json.dumps(self.pod_job(request))),
                      k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
                      k8s.V1EnvVar(name=POD_WORKSPACE_ENV, value=POD_WORKSPACE)] + secret_env,
            env_from=env_from,
            container_resources=k8s.V1ResourceRequirements(limits=limits, requests=requests_),
            volumes=[k8s.V1Volume(name="workspace", empty_dir=k8s.V1EmptyDirVolumeSource(
                size_limit=self.workspace_size))],
            volume_mounts=[k8s.V1VolumeMount(name="workspace", mount_path=POD_WORKSPACE)],
            tolerations=tolerations,
            node_selector=self.node_selector,
            service_account_name=self.service_account_name,
            kubernetes_conn_id=self.kubernetes_conn_id,
            startup_timeout_seconds=self.startup_timeout_seconds,
            get_logs=True,
            do_xcom_push=False,  # the outcome is read from the published folder, not a sidecar
            on_finish_action="delete_succeeded_pod",
            labels={"app": "mask2former", "mask2former-action": request.action},
        )

    def run(self, request: JobRequest) -> None:
        self._pod_operator = self.build_operator(request, task_id=request.extra.get("task_id", request.action))
        request.log(f"running {request.action} in a pod of image {self.image} ({self.gpus} GPU(s)) in namespace "
                    f"{self.namespace}; results go to {request.paths.publish_uri}")
        self._pod_operator.execute(request.context)
        return None

    def kill(self) -> None:
        if self._pod_operator is not None:
            self._pod_operator.on_kill()
