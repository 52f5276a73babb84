"""The shared base of the Mask2Former operators: check the spec once, launch the job, follow it, return its XCom.

At DAG parse an operator only stores its arguments and checks its literals (spec overrides against the
schemas, dataset format, checkpoint choose method, the launcher, where the encryption key comes from).
At execute it:

1. plans the data sources from the dataset roots, resolves the parent model from ``parent`` (the upstream
   task's XCom) and checks the whole spec once (:func:`~operators.utils.overrides.job_overrides`): a bad key
   fails the task for good, naming it, before anything is staged or run;
2. launches the job entry point (:mod:`operators.pod_job`: restore, stage, run the engine, publish with
   ``_FINISHED`` last) through its launcher: a child process on this worker (the embedded default), a
   detached local process, or a Kubernetes pod;
3. follows the job to its end: the child's output into the task log; a detached job or a pod through
   its job folder by :class:`~operators.triggers.job.Mask2FormerJobTrigger`, deferred (``deferrable``:
   no worker slot is held, and a restarted worker or scheduler leaves the job running) or waiting here;
4. returns the job's XCom dict (:mod:`operators.utils.outcome`), read through the storage hook.

A job whose folder still has a live heartbeat (a retried task whose job survived) is followed, not started
again. Killing the task stops the job: the child through SIGTERM; a detached job or a pod through a stop
request in its folder (from ``on_kill``, or from the trigger when the task is killed while deferred).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import time
from functools import cached_property
from typing import Any, ClassVar, Dict, Optional, Sequence

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from mask2former import results
from mask2former.config import SpecError
from mask2former.crypto import KEY_ENV
from mask2former.data.sources import DATASET_FORMATS, NO_DATA_ACTIONS, join_uri, plan_data_sources, uri_scheme
from mask2former.uris import without_credentials

from ..hooks.storage import Mask2FormerStorageHook
from ..launchers import KubernetesPodLauncher, check_launcher
from ..links.job import Mask2FormerJobLink
from ..pod_job import EXIT_USAGE
from ..triggers.job import Mask2FormerJobTrigger
from ..utils.encryption import EncryptionKeyArguments
from ..utils.gpu import gpu_routing
from ..utils.jobs import JobPaths, default_results_root, job_id, record_job_location
from ..utils.outcome import published_outcome
from ..utils.overrides import coerce_overrides, is_templated, job_overrides, validate_literal_overrides
from ..utils.parents import ParentError, resolve_parent
from ..utils.tracking import RUN_ID_ENV, TRACKING_URI_ENV, is_loopback, mlflow_environment, parent_run_id

#: Data-source keys of the training split, which only train reads (evaluate/inference/quantize keep
#: the label map and their own splits, so their staging never downloads the training annotations).
_TRAIN_SPLIT_KEYS = ("dataset.train.img_dir", "dataset.train.instance_json", "dataset.train.panoptic_json",
                     "dataset.train.panoptic_dir", "dataset.train.annot_file", "dataset.train.root_dir")


def stale_after(check_interval: float) -> float:
    """Seconds without a heartbeat after which a job counts as dead."""
    return max(6 * check_interval, 60.0)


async def _first_event(trigger: Mask2FormerJobTrigger) -> Dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AirflowException("the job trigger ended without an event")


class Mask2FormerBaseOperator(EncryptionKeyArguments, BaseOperator):
    """Runs one Mask2Former engine action as an Airflow task (subclasses set ``action``).

    :param spec_overrides: flat dotted spec keys (``{"train.num_epochs": 10}``), shared by a whole
        pipeline: each action keeps the keys of the sections it reads; every key is validated.
    :param train_datasets: training dataset root (``s3://``, ``file://`` or a path) holding
        images.tar.gz, annotations*.json, images_panoptic.tar.gz, label_map*.json.
    :param eval_dataset: evaluation dataset root (validation split, inference images).
    :param dataset_format: ``coco``, ``coco_panoptic`` or ``ade`` (needed with a dataset root).
    :param results_root: where job folders are published (local path or ``s3://``); default: the
        Variable ``mask2former_results_root``, env ``MASK2FORMER_RESULTS_ROOT``, ``$AIRFLOW_HOME/mask2former/results``.
    :param parent: the XCom dict of the upstream Mask2Former task whose model this one takes.
    :param checkpoint_choose_method: ``best_model``, ``latest_model`` or ``from_epoch_number``.
    :param checkpoint_epoch_number: the epoch for ``from_epoch_number``.
    :param aws_conn_id: Airflow connection of the S3 (or MinIO) store.
    :param encryption_key_conn_id: Airflow connection whose password is the key that opens the encrypted
        models this job reads and encrypts the models it writes (read at execute time, masked in logs,
        handed to the job only through its environment).
    :param encryption_key_variable: the same key from an Airflow Variable (give one of the two).
    :param launcher: :class:`~operators.launchers.LocalProcessLauncher` (default) or
        :class:`~operators.launchers.KubernetesPodLauncher`.
    :param deferrable: follow a detached job from the triggerer instead of holding a worker slot (default:
        ``[operators] default_deferrable``, False).
    :param wait_for_completion: False returns as soon as the job is launched (it runs detached).
    :param check_interval: seconds between looks at a detached job (and between its heartbeats).
    :param mlflow_conn_id: Airflow connection of an MLflow tracking server (its extra ``tracking_uri``, else
        ``schema://host:port``, schema default http; extra ``experiment_name``, default mask2former), handed to
        the job (a local process or a pod) as ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``: a training
        job logs its params, per-epoch metrics and best checkpoint there, an export job adds the ONNX model to
        the training run (the parent XCom's ``mlflow.run_id``, as ``MLFLOW_RUN_ID``), and the run id comes back
        in the XCom (``mlflow``). The spec's
        ``mlflow.tracking_uri`` / ``mlflow.experiment_name``, when set, win over the connection (the spec is
        the more specific statement). A pod cannot reach a ``localhost`` / ``127.0.0.1`` server, and its spec
        would show a ``user:password@`` in the URI: such URIs are refused before the pod is created.
    :param job_timeout: the longest a detached job may run (seconds or a timedelta); then it is stopped and
        the task fails.
    """

    action: ClassVar[str] = ""
    #: Stages that want a GPU go to the GPU queue and pool when the deployment has GPU workers
    #: (:func:`~operators.utils.gpu.gpu_routing`); an explicit ``queue``/``pool`` argument wins.
    wants_gpu: ClassVar[bool] = False
    template_fields: Sequence[str] = ("spec_overrides", "train_datasets", "eval_dataset", "dataset_format",
                                      "results_root", "parent", "checkpoint_choose_method")
    template_fields_renderers = {"spec_overrides": "json", "parent": "json"}
    operator_extra_links = (Mask2FormerJobLink(),)
    shallow_copy_attrs: Sequence[str] = ("launcher",)
    ui_color = "#76b900"
    ui_fgcolor = "#ffffff"

    def __init__(self, *, spec_overrides: Any = None, train_datasets: Any = None, eval_dataset: Any = None,
                 dataset_format: Any = None, results_root: Any = None, parent: Any = None,
                 checkpoint_choose_method: Any = "best_model", checkpoint_epoch_number: Optional[int] = None,
                 aws_conn_id: Optional[str] = "aws_default", encryption_key_conn_id: Optional[str] = None,
                 encryption_key_variable: Optional[str] = None, launcher: Any = None,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
                 wait_for_completion: bool = True, check_interval: float = 10.0,
                 job_timeout: Optional[Any] = None, mlflow_conn_id: Optional[str] = None, **kwargs: Any) -> None:
        if self.wants_gpu:
            for name, value in gpu_routing().task_arguments().items():
                kwargs.setdefault(name, value)
        super().__init__(**kwargs)
        self.spec_overrides = spec_overrides
        self.train_datasets = train_datasets
        self.eval_dataset = eval_dataset
        self.dataset_format = dataset_format
        self.results_root = results_root
        self.parent = parent
        self.checkpoint_choose_method = checkpoint_choose_method
        self.checkpoint_epoch_number = checkpoint_epoch_number
        self.aws_conn_id = aws_conn_id
        self.encryption_key_conn_id = encryption_key_conn_id
        self.encryption_key_variable = encryption_key_variable
        self.launcher = launcher
        self.deferrable = deferrable
        self.wait_for_completion = wait_for_completion
        self.check_interval = check_interval
        self.job_timeout = job_timeout.total_seconds() if isinstance(job_timeout, dt.timedelta) else job_timeout
        self.mlflow_conn_id = mlflow_conn_id
        self._check_literals()
        self._following: Optional[Dict[str, Any]] = None
        self._outcome: Optional[Dict[str, Any]] = None

    def _check_literals(self) -> None:
        """Parse-time checks of literal (non-templated) arguments: a mistake is a DAG import error."""
        where = f"{type(self).__name__}(task_id={self.task_id!r})"
        try:
            self.launcher = check_launcher(self.launcher)
            validate_literal_overrides(self.action, self.spec_overrides)
            source = self.encryption_key_source
        except (SpecError, ValueError) as exc:
            raise SpecError(f"{where}: {exc}") from None
        fmt, choose = self.dataset_format, self.checkpoint_choose_method
        if isinstance(fmt, str) and not is_templated(fmt) and fmt not in DATASET_FORMATS:
            raise SpecError(f"{where}: dataset_format {fmt!r} is not one of {', '.join(DATASET_FORMATS)}.")
        if isinstance(choose, str) and not is_templated(choose) and choose not in results.CHOOSE_METHODS:
            raise SpecError(f"{where}: checkpoint_choose_method {choose!r} is not one of "
                            f"{', '.join(results.CHOOSE_METHODS)}.")
        if source.configured and not self.launcher.takes_encryption_key:
            raise SpecError(f"{where}: {type(self.launcher).__name__} takes the encryption key from a Kubernetes "
                            "Secret (encryption_key_secret_name), never from the pod spec; remove "
                            "encryption_key_conn_id / encryption_key_variable.")
        if not (isinstance(self.check_interval, (int, float)) and self.check_interval > 0):
            raise SpecError(f"{where}: check_interval must be a positive number of seconds, got {self.check_interval!r}.")
        if self.job_timeout is not None and not (isinstance(self.job_timeout, (int, float)) and self.job_timeout > 0):
            raise SpecError(f"{where}: job_timeout must be a positive number of seconds or a timedelta, got "
                            f"{self.job_timeout!r}.")

    @cached_property
    def hook(self) -> Mask2FormerStorageHook:
        return Mask2FormerStorageHook(aws_conn_id=self.aws_conn_id)

    # ------------------------------------------------------------------------------------ execute

    def job_paths(self, context: Any) -> JobPaths:
        ti = context["ti"]
        return JobPaths.resolve(job=job_id(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1)),
                                results_root=self.results_root or default_results_root())

    def job_spec(self) -> Dict[str, Any]:
        """The job's spec keys, checked once: planned data sources, then the parent model, then the user's keys.
        A bad one fails the task for good (a retry would fail the same way), before anything is staged or run."""
        try:
            derived = self.planned_sources()
            parent = resolve_parent(self.action, self.parent, choose=self.checkpoint_choose_method,
                                    epoch=self.checkpoint_epoch_number, hook=self.hook)
            overrides = job_overrides(self.action, coerce_overrides(self.spec_overrides), {**derived, **parent})
        except (SpecError, ParentError) as exc:
            raise AirflowFailException(f"{self.action}: {exc} Nothing was staged or run.") from None
        for key, value in parent.items():
            self.log.info("parent model: %s = %s", key, value)
        return overrides

    def execute(self, context: Any) -> Dict[str, Any]:
        overrides = self.job_spec()
        paths = self.job_paths(context)
        record_job_location(context, paths, aws_conn_id=self.aws_conn_id)
        try:
            self.check_can_run()
        except AirflowSkipException as skip:
            self.record_skip(paths, str(skip))
            raise
        live = self.live_job(paths)
        if live is not None:
            self.log.info("%s job %s is still running (heartbeat %.0f s ago): following it instead of starting "
                          "another", self.action, paths.job_id, time.time() - live["time"])
            pod = self.pod_of(live)
            return self.follow(context, paths, pod)
        key = self.encryption_key_source.resolve()
        if key:
            self.log.info("%s: encrypted models are opened and written with %s", self.action,
                          self.encryption_key_source.describe())
        self.hook.clear_job_controls(paths.publish_uri)
        job = self.launcher.describe(action=self.action, paths=paths, overrides=overrides,
                                     check_interval=self.check_interval)
        env = self.job_env(job.publish_uri, overrides, key)
        self.log.info("%s job %s: runs in %s, published to %s", self.action, paths.job_id, job.local_dir,
                      paths.publish_uri)
        if self.launcher.runs_here and not self.deferrable and self.wait_for_completion:
            self._following = {"child": True}
            code = self.launcher.run(job, env, self.log.info)
            return self.finished(paths, code)
        handle = self.launcher.start(job, env, self.log.info)
        return self.follow(context, paths, handle if isinstance(self.launcher, KubernetesPodLauncher) else None)

    def record_skip(self, paths: JobPaths, reason: str) -> None:
        """A skipped task's job folder holds one SKIPPED status line with the reason, so that its job page (the
        task's extra link) explains the skip. A folder an earlier attempt already wrote is left alone."""
        status_uri = join_uri(paths.publish_uri, results.STATUS_FILE)
        try:
            if not self.hook.exists(status_uri):
                now = dt.datetime.now(dt.timezone.utc)
                line = {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M:%S"), "status": "SKIPPED",
                        "message": reason, "action": self.action}
                self.hook.write_bytes(status_uri, (json.dumps(line) + "\n").encode())
        except Exception as error:  # noqa: BLE001 - the skip stands even when its record cannot be written
            self.log.warning("could not record the skip in %s: %s", paths.publish_uri, error)

    def job_env(self, publish_uri: str, overrides: Dict[str, Any], key: Optional[str]) -> Dict[str, str]:
        """What the job needs from this worker: the MLflow settings of ``mlflow_conn_id``; for a local process
        also the connection's S3 settings when it touches S3, and the encryption key (a pod gets those two from
        Kubernetes Secrets)."""
        tracking = self.tracking_env(overrides)
        if not self.launcher.runs_here:
            return tracking
        touches_s3 = uri_scheme(publish_uri) == "s3" or any(
            isinstance(v, str) and v.startswith("s3://") for v in overrides.values())
        env = {**(self.hook.job_environment() if touches_s3 else {}), **tracking}
        return {**env, KEY_ENV: key} if key else env

    def tracking_env(self, overrides: Dict[str, Any]) -> Dict[str, str]:
        """``mlflow_conn_id`` as MLflow's environment variables; logs the tracking URI the job will use (the
        spec's ``mlflow.tracking_uri`` wins), and refuses for a pod a loopback URI (the pod could not reach it)
        or one with credentials (the pod spec would show them)."""
        env = mlflow_environment(self.mlflow_conn_id) if self.mlflow_conn_id else {}
        spec_uri = overrides.get("mlflow.tracking_uri")
        uri = spec_uri or env.get(TRACKING_URI_ENV)
        if not uri:
            return env
        source = "the spec's mlflow.tracking_uri" if spec_uri else f"connection {self.mlflow_conn_id!r}"
        overruled = f"; it wins over connection {self.mlflow_conn_id!r}" if spec_uri and env else ""
        if is_loopback(uri) and not self.launcher.runs_here:
            raise AirflowFailException(
                f"{self.action}: the MLflow tracking URI {without_credentials(uri)} (from {source}) names "
                "localhost, which inside a pod is the pod itself: give a URI the pod can reach (a Service name "
                "such as http://mlflow.<namespace>.svc:5000, or an external address). Nothing was run.")
        if without_credentials(uri) != uri and not self.launcher.runs_here:
            raise AirflowFailException(
                f"{self.action}: the MLflow tracking URI {without_credentials(uri)} (from {source}) carries "
                "credentials, which a pod spec would show in plain text: give them as MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD entries of a Kubernetes Secret the pod reads (aws_secret_name's "
                "entries all become its environment). Nothing was run.")
        self.log.info("%s: MLflow tracking at %s (from %s%s)", self.action, without_credentials(uri), source,
                      overruled)
        run_id = parent_run_id(self.parent) if self.action == "export" else None
        return {**env, RUN_ID_ENV: run_id} if run_id else env

    def live_job(self, paths: JobPaths) -> Optional[Dict[str, Any]]:
        """The heartbeat of a job still running in this task's folder (an earlier attempt's), or None. A recent
        heartbeat of a process of this machine that no longer exists (its worker was killed with it) is no job."""
        beat = self.hook.last_beat(paths.publish_uri)
        if beat is None or "exit_code" in beat or time.time() - beat["time"] > stale_after(self.check_interval):
            return None
        if beat.get("host") == socket.gethostname() and isinstance(beat.get("pid"), int) \
                and not _process_exists(beat["pid"]):
            self.log.info("%s job %s: the earlier attempt's job process %d is gone (heartbeat %.0f s ago); "
                          "starting again", self.action, paths.job_id, beat["pid"], time.time() - beat["time"])
            return None
        return beat

    def pod_of(self, beat: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A live job's pod (a pod's hostname is its name), when this task runs pods."""
        if not isinstance(self.launcher, KubernetesPodLauncher):
            return None
        return {"name": beat.get("host"), "namespace": self.launcher.namespace,
                "kubernetes_conn_id": self.launcher.kubernetes_conn_id}

    def follow(self, context: Any, paths: JobPaths, pod: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Follow a launched job: return at once, defer to the trigger, or wait for it on this worker."""
        if not self.wait_for_completion:
            self.log.info("%s job %s launched; not waiting for it (wait_for_completion=False)", self.action,
                          paths.job_id)
            return published_outcome(self.hook, action=self.action, job_id=paths.job_id, publish_uri=paths.publish_uri)
        started = time.time()
        trigger = Mask2FormerJobTrigger(
            job_uri=paths.publish_uri, aws_conn_id=self.aws_conn_id, check_interval=self.check_interval,
            started_at=started, startup_timeout=self.launcher.startup_timeout,
            stale_after=stale_after(self.check_interval),
            deadline=started + self.job_timeout if self.job_timeout else None, pod=pod)
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete", kwargs={"pod": pod})
        self._following = {"uri": paths.publish_uri, "pod": pod}
        return self.execute_complete(context, asyncio.run(_first_event(trigger)), pod=pod)

    def execute_complete(self, context: Any, event: Dict[str, Any], pod: Optional[Dict[str, Any]] = None
                         ) -> Dict[str, Any]:
        """Resume after the trigger fired: the job's XCom, or the task fails saying why."""
        paths = self.job_paths(context)
        if event.get("status") == "error":
            raise AirflowException(f"{self.action} job {paths.job_id}: {event.get('message')}")
        outcome = self.finished(paths, (self.hook.last_beat(paths.publish_uri) or {}).get("exit_code"))
        if pod and isinstance(self.launcher, KubernetesPodLauncher):
            self.launcher.delete(pod)
        return outcome

    def finished(self, paths: JobPaths, code: Optional[int]) -> Dict[str, Any]:
        """The XCom of an ended job; a failed job fails the task with its last status message."""
        outcome = published_outcome(self.hook, action=self.action, job_id=paths.job_id, publish_uri=paths.publish_uri)
        if outcome["status"] != "SUCCESS" or code:
            lines, _ = self.hook.read_status(paths.publish_uri)
            why = lines[-1].get("message") if lines else "no status line"
            error = AirflowFailException if code == EXIT_USAGE else AirflowException
            raise error(f"{self.action} job {paths.job_id} failed (exit status {code}): {why}; its folder "
                        f"{paths.publish_uri} keeps what it wrote")
        self.log.info("%s %s: metrics %s; artifacts %s", self.action, outcome["status"], outcome["metrics"],
                      outcome["artifacts"])
        self._outcome = outcome
        return outcome

    def check_can_run(self) -> None:
        """Raise AirflowSkipException when this worker cannot run the action (see the TensorRT operator)."""

    def planned_sources(self) -> Dict[str, Any]:
        """The dataset overrides of this action from the dataset roots ({} when none is given)."""
        train_root = self.train_datasets or None
        eval_root = self.eval_dataset or None
        if self.action in NO_DATA_ACTIONS or (train_root is None and eval_root is None):
            return {}
        if self.dataset_format is None:
            raise SpecError(f"dataset_format is needed with a dataset root; expected one of "
                            f"{', '.join(DATASET_FORMATS)}.")
        try:
            planned = plan_data_sources(self.action, train_root or eval_root, eval_root, self.dataset_format,
                                        exists=self.hook.exists)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        if self.action != "train":
            planned = {k: v for k, v in planned.items() if k not in _TRAIN_SPLIT_KEYS}
        return planned

    # ------------------------------------------------------------------------------- lineage

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:  # noqa: ARG002 - provider's signature
        """OpenLineage (apache-airflow-providers-openlineage): the dataset roots and the parent model in, the
        models this job wrote out (read by the provider when installed; see operators/utils/lineage.py)."""
        from ..utils.lineage import operator_lineage

        parent = self.parent if isinstance(self.parent, dict) else {}
        parent_models = [(parent.get("artifacts") or {}).get(kind) for kind in ("best_checkpoint", "checkpoint",
                                                                                "onnx", "engine", "quantized")]
        return operator_lineage(inputs=[self.train_datasets, self.eval_dataset, *parent_models],
                                outcome=self._outcome)

    def on_kill(self) -> None:
        """The task is killed: stop its job (the child by SIGTERM, a detached job or pod through its folder).
        execute then raises: a killed job never ends as a success."""
        following = self._following or {}
        if following.get("child"):
            self.launcher.kill()
        elif following.get("uri"):
            self.hook.request_stop(following["uri"], "the Airflow task was killed")
            if following.get("pod"):
                self.launcher.delete(following["pod"])


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
