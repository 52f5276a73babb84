"""Where an operator's job runs: a local process on the worker, or a Kubernetes pod (GPU stages).

Both run the job entry point (:mod:`operators.pod_job`) on a :class:`~operators.utils.jobs.JobDescription`.

* :class:`LocalProcessLauncher`: ``run`` keeps the process a child of the task (its output in the task log;
  the embedded default); ``start`` detaches it (its own session, output in ``job.log`` of the job folder),
  so that a deferred task, a restarted worker or scheduler leave it running.
* :class:`KubernetesPodLauncher`: ``start`` creates the pod through the cncf.kubernetes provider's
  :class:`~airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook`; the operator then follows
  the job through storage (deferred, or waiting on the worker), never through the pod's logs.

A job process reaches storage with its own credentials: a local one gets the operator's connection's
(:meth:`~operators.hooks.storage.Mask2FormerStorageHook.job_environment`) and encryption key in its
environment; a pod gets them from Kubernetes Secrets (``aws_secret_name``, ``encryption_key_secret_name``:
``secretKeyRef``s, never literals in the pod spec) or its service account. The MLflow settings
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID``: no secrets) are the only worker values
a pod spec carries literally.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mask2former.crypto import KEY_ENV
from mask2former.processes import terminate_process_group

from .utils.jobs import JOB_ENV, JobDescription, JobPaths, cache_root, process_env
from .utils.tracking import TRACKING_ENV

#: Never handed to a job process: the worker's connections, variables, cloud credentials and settings.
SECRET_ENV_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__", "AWS_", KEY_ENV)
JOB_LOG = "job.log"
POD_WORKSPACE = "/workspace"
GPU_RESOURCE = "nvidia.com/gpu"

Log = Callable[[str], None]


def job_process_env(extra: Dict[str, str]) -> Dict[str, str]:
    """A local job process's environment: the worker's without its secrets, plus ``extra`` (the job, its
    storage credentials, its encryption key)."""
    return {**process_env(os.environ, drop=SECRET_ENV_PREFIXES), **extra}


class LocalProcessLauncher:
    """The job as a local process on this worker (see the module docstring).

    :param python: the interpreter (default: the worker's).
    :param kill_grace_s: seconds between SIGTERM and SIGKILL when the task is killed.
    """

    takes_encryption_key = True
    #: Data are staged and GPUs found on this machine.
    runs_here = True
    #: Seconds a new process may take to send its first heartbeat.
    startup_timeout = 300.0

    def __init__(self, *, python: Optional[str] = None, kill_grace_s: float = 30.0) -> None:
        self.python = python or sys.executable
        self.kill_grace_s = kill_grace_s
        self._process: Optional[subprocess.Popen] = None

    def describe(self, *, action: str, paths: JobPaths, overrides: Dict[str, Any], check_interval: float
                 ) -> JobDescription:
        return JobDescription(action=action, job_id=paths.job_id, overrides=overrides, publish_uri=paths.publish_uri,
                              local_dir=str(paths.local_dir), cache_dir=str(cache_root()),
                              check_interval=check_interval)

    def _command(self) -> List[str]:
        return [self.python, "-m", "operators.pod_job"]

    def run(self, job: JobDescription, env: Dict[str, str], log: Log) -> int:
        """Run the job as a child process (own process group), its output into ``log``; its exit status."""
        self._process = subprocess.Popen(self._command(), env=job_process_env({**env, JOB_ENV: job.to_json()}),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        log(f"{job.action} job {job.job_id}: pid {self._process.pid} (own process group)")
        assert self._process.stdout is not None
        for raw in iter(self._process.stdout.readline, b""):
            text = raw.decode(errors="replace").rstrip("\n").split("\r")[-1].rstrip()
            if text:
                log(text)
        return self._process.wait()

    def start(self, job: JobDescription, env: Dict[str, str], log: Log) -> Dict[str, Any]:
        """Start the job detached from this task (its own session); returns ``{"pid"}``."""
        folder = Path(job.local_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / JOB_LOG, "ab") as output:
            process = subprocess.Popen(self._command(), env=job_process_env({**env, JOB_ENV: job.to_json()}),
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=folder)
        log(f"{job.action} job {job.job_id}: detached process {process.pid}, output in {folder / JOB_LOG}")
        return {"pid": process.pid}

    def kill(self) -> None:
        """End the child job (SIGTERM: it stops the engine and publishes; SIGKILL after the grace period)."""
        if self._process is not None:
            terminate_process_group(self._process, self.kill_grace_s)


class KubernetesPodLauncher:
    """The job as a Kubernetes pod (see the module docstring); the results root must be ``s3://``.

    :param image: the project's image (the Dockerfile's), holding the engine and this package.
    :param gpus: ``nvidia.com/gpu`` limit; with GPUs the pod tolerates the ``nvidia.com/gpu`` taint unless
        ``tolerations`` says otherwise.
    :param cpu, memory: requests (memory is also the limit).
    :param node_selector, tolerations: where the pod may run (tolerations as dicts of V1Toleration fields).
    :param aws_secret_name: a Secret whose entries (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
        ...) become the pod's environment; without it, the pod's service account (IRSA) reaches S3.
    :param encryption_key_secret_name, encryption_key_secret_key: the Secret entry that becomes the pod's
        MASK2FORMER_ENCRYPTION_KEY.
    """

    takes_encryption_key = False
    runs_here = False

    def __init__(self, *, image: str, namespace: str = "default", gpus: int = 1, cpu: Optional[str] = "4",
                 memory: Optional[str] = "16Gi", workspace_size: str = "50Gi",
                 node_selector: Optional[Dict[str, str]] = None, tolerations: Optional[List[Dict[str, Any]]] = None,
                 service_account_name: Optional[str] = None, aws_secret_name: Optional[str] = None,
                 encryption_key_secret_name: Optional[str] = None, encryption_key_secret_key: str = KEY_ENV,
                 kubernetes_conn_id: Optional[str] = "kubernetes_default", image_pull_policy: str = "IfNotPresent",
                 startup_timeout_seconds: int = 600, labels: Optional[Dict[str, str]] = None) -> None:
        if not image:
            raise ValueError("KubernetesPodLauncher needs the image that holds the engine (image=...).")
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
        self.node_selector = node_selector
        self.tolerations = tolerations
        self.service_account_name = service_account_name
        self.aws_secret_name = aws_secret_name
        self.encryption_key_secret_name = encryption_key_secret_name
        self.encryption_key_secret_key = encryption_key_secret_key
        self.kubernetes_conn_id = kubernetes_conn_id
        self.image_pull_policy = image_pull_policy
        self.startup_timeout = float(startup_timeout_seconds)
        self.labels = labels or {}

    def describe(self, *, action: str, paths: JobPaths, overrides: Dict[str, Any], check_interval: float
                 ) -> JobDescription:
        return JobDescription(action=action, job_id=paths.job_id, overrides=overrides, publish_uri=paths.publish_uri,
                              local_dir=f"{POD_WORKSPACE}/job", cache_dir=f"{POD_WORKSPACE}/cache",
                              check_interval=check_interval)

    def pod(self, job: JobDescription, *, name: str, labels: Optional[Dict[str, str]] = None,
            settings: Optional[Dict[str, str]] = None) -> Any:
        """The pod that runs ``job`` (built, not created); ``settings`` are plain environment values (MLflow's)."""
        from kubernetes.client import models as k8s

        limits = {GPU_RESOURCE: str(self.gpus)} if self.gpus else {}
        requests = {"cpu": self.cpu} if self.cpu else {}
        if self.memory:
            requests["memory"] = limits["memory"] = self.memory
        tolerations = self.tolerations if self.tolerations is not None else (
            [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if self.gpus else [])
        env = [k8s.V1EnvVar(name=JOB_ENV, value=job.to_json()), k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
        env += [k8s.V1EnvVar(name=name, value=value) for name, value in sorted((settings or {}).items())]
        if self.encryption_key_secret_name:
            env.append(k8s.V1EnvVar(name=KEY_ENV, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
                name=self.encryption_key_secret_name, key=self.encryption_key_secret_key))))
        container = k8s.V1Container(
            name="mask2former", image=self.image, image_pull_policy=self.image_pull_policy,
            command=["python", "-m", "operators.pod_job"], env=env,
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=self.aws_secret_name))]
            if self.aws_secret_name else None,
            resources=k8s.V1ResourceRequirements(limits=limits, requests=requests),
            volume_mounts=[k8s.V1VolumeMount(name="workspace", mount_path=POD_WORKSPACE)])
        return k8s.V1Pod(
            api_version="v1", kind="Pod",
            metadata=k8s.V1ObjectMeta(name=name, namespace=self.namespace, labels={
                "app": "mask2former", "mask2former-action": job.action.replace("_", "-"), **self.labels,
                **(labels or {})}),
            spec=k8s.V1PodSpec(
                containers=[container], restart_policy="Never", node_selector=self.node_selector,
                tolerations=[k8s.V1Toleration(**t) for t in tolerations] or None,
                service_account_name=self.service_account_name,
                volumes=[k8s.V1Volume(name="workspace", empty_dir=k8s.V1EmptyDirVolumeSource(
                    size_limit=self.workspace_size))]))

    def start(self, job: JobDescription, env: Dict[str, str], log: Log) -> Dict[str, Any]:
        """Create the pod through the provider's hook; returns ``{"name", "namespace", "kubernetes_conn_id"}``.
        ``env`` may hold only the plain MLflow settings (``TRACKING_ENV``), which become literal values of the pod
        spec; a pod's secrets come from Kubernetes Secrets, never from the worker."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import add_unique_suffix

        if set(env) - set(TRACKING_ENV):
            raise ValueError("a pod takes its credentials and key from Kubernetes Secrets, never from the worker")
        name = add_unique_suffix(name=f"mask2former-{job.action.replace('_', '-')}")
        hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        hook.core_v1_client.create_namespaced_pod(namespace=self.namespace,
                                                  body=self.pod(job, name=name, settings=env))
        log(f"{job.action} job {job.job_id}: pod {self.namespace}/{name} of image {self.image} "
            f"({self.gpus} GPU(s)); results go to {job.publish_uri}")
        return {"name": name, "namespace": self.namespace, "kubernetes_conn_id": self.kubernetes_conn_id}

    def delete(self, pod: Dict[str, Any]) -> None:
        """Delete a finished pod (a failed one is kept for its logs, as the provider's operator does)."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        KubernetesHook(conn_id=pod["kubernetes_conn_id"]).core_v1_client.delete_namespaced_pod(
            name=pod["name"], namespace=pod["namespace"])

    def kill(self) -> None:
        """A pod is stopped through its job folder and deleted by the operator (nothing runs here)."""


LAUNCHERS = (LocalProcessLauncher, KubernetesPodLauncher)


def check_launcher(launcher: Any) -> Any:
    """The launcher, or ValueError in one sentence when it is not one (a string such as "kubernetes" names no
    image, namespace or GPUs)."""
    if launcher is None:
        return LocalProcessLauncher()
    if not isinstance(launcher, LAUNCHERS):
        raise ValueError(f"launcher={launcher!r} is not a launcher: give LocalProcessLauncher() (the default) or "
                         "KubernetesPodLauncher(image=..., gpus=..., ...) from the operators package.")
    return launcher


__all__ = ["KubernetesPodLauncher", "LocalProcessLauncher", "check_launcher", "job_process_env"]
