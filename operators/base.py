"""The shared base of the Mask2Former operators: build and validate the spec, stage, launch, publish.

At DAG parse an operator only stores its arguments and checks its literal spec overrides against the
schemas (jsonschema, no torch). At execute it:

1. validates the (rendered) overrides and fails the task naming the key, before touching any data
   (a secret key such as ``encryption_key`` is refused there: see :mod:`operators.encryption`), then reads
   the encryption key from its connection or Variable when one is named;
2. plans the data sources from ``train_datasets`` / ``eval_dataset`` / ``dataset_format``
   (:func:`mask2former.data.sources.plan_data_sources`) and resolves the parent model from ``parent``
   (the upstream task's XCom) with ``checkpoint_choose_method``;
3. validates the whole spec with :func:`mask2former.config.load_spec` (cross-key rules included);
4. hands the job to its launcher (a local subprocess by default), which stages the data through the
   Amazon provider's S3 client of ``aws_conn_id``, writes ``spec.yaml`` into the job folder, runs
   ``python -m mask2former ACTION``, follows status.json into the task log and publishes the folder to
   ``results_root`` (``_FINISHED`` last);
5. returns the job's XCom dict (see :mod:`operators.outcome`).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from mask2former import results
from mask2former.config import SpecError, load_spec
from mask2former.data.sources import DATASET_FORMATS, NO_DATA_ACTIONS, plan_data_sources, source_exists_checker
from mask2former.data.staging import airflow_s3_client_factory

from .encryption import EncryptionKeyArguments
from .jobs import JobPaths, cache_root, default_results_root, job_id
from .launchers import JobRequest, LocalProcessLauncher
from .links import Mask2FormerJobLink
from .outcome import job_outcome
from .overrides import (coerce_overrides, is_templated, overrides_for_action, validate_literal_overrides,
                        validate_overrides)
from .parents import ParentError, resolve_parent
from .remote import build_index

#: Data-source keys of the training split, which only train reads (evaluate/inference/quantize keep
#: the label map and their own splits, so their staging never downloads the training annotations).
_TRAIN_SPLIT_KEYS = ("dataset.train.img_dir", "dataset.train.instance_json", "dataset.train.panoptic_json",
                     "dataset.train.panoptic_dir")


class Mask2FormerBaseOperator(EncryptionKeyArguments, BaseOperator):
    """Runs one Mask2Former engine action as an Airflow task (subclasses set ``action``).

    :param spec_overrides: flat dotted spec keys (``{"train.num_epochs": 10}``), shared by a whole
        pipeline: each action keeps the keys of the sections it reads; every key is validated.
    :param train_datasets: training dataset root (``s3://``, ``file://`` or a path) holding
        images.tar.gz, annotations*.json, images_panoptic.tar.gz, label_map*.json.
    :param eval_dataset: evaluation dataset root (validation split, inference images).
    :param dataset_format: ``coco`` or ``coco_panoptic`` (needed with a dataset root).
    :param results_root: where job folders are published (local path or ``s3://``); default: the
        Variable ``mask2former_results_root``, env ``MASK2FORMER_RESULTS_ROOT``, ``$AIRFLOW_HOME/mask2former/results``.
    :param parent: the XCom dict of the upstream Mask2Former task whose model this one takes.
    :param checkpoint_choose_method: ``best_model``, ``latest_model`` or ``from_epoch_number``.
    :param checkpoint_epoch_number: the epoch for ``from_epoch_number``.
    :param aws_conn_id: Airflow connection of the S3 (or MinIO) store.
    :param encryption_key_conn_id: Airflow connection whose password is the key that opens the encrypted
        models this job reads and encrypts the models it writes (read at execute time, masked in logs,
        handed to the engine only through its environment).
    :param encryption_key_variable: the same key from an Airflow Variable (give one of the two).
    :param launcher: :class:`~operators.launchers.LocalProcessLauncher` (default) or
        :class:`~operators.launchers.KubernetesPodLauncher`.
    """

    action: ClassVar[str] = ""
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
                 aws_conn_id: str = "aws_default", encryption_key_conn_id: Optional[str] = None,
                 encryption_key_variable: Optional[str] = None, launcher: Any = None, **kwargs: Any) -> None:
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
        self.encryption_key_variable = encryption_key_variable  # checked with the other literals below
        self.launcher = launcher if launcher is not None else LocalProcessLauncher()
        self._check_literals()

    def _check_literals(self) -> None:
        """Parse-time checks of literal (non-templated) arguments: a typo is a DAG import error."""
        where = f"{type(self).__name__}(task_id={self.task_id!r})"
        try:
            validate_literal_overrides(self.action, self.spec_overrides)
        except SpecError as exc:
            raise SpecError(f"{where}: spec_overrides: {exc}") from None
        fmt = self.dataset_format
        if isinstance(fmt, str) and not is_templated(fmt) and fmt not in DATASET_FORMATS:
            raise SpecError(f"{where}: dataset_format {fmt!r} is not one of {', '.join(DATASET_FORMATS)}.")
        choose = self.checkpoint_choose_method
        if isinstance(choose, str) and not is_templated(choose) and choose not in results.CHOOSE_METHODS:
            raise SpecError(f"{where}: checkpoint_choose_method {choose!r} is not one of "
                            f"{', '.join(results.CHOOSE_METHODS)}.")
        try:
            source = self.encryption_key_source
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if source.configured and not getattr(self.launcher, "takes_encryption_key", True):
            raise SpecError(f"{where}: {type(self.launcher).__name__} takes the encryption key from a Kubernetes "
                            "Secret (encryption_key_secret_name), never from the pod spec; remove "
                            "encryption_key_conn_id / encryption_key_variable.")


    # ------------------------------------------------------------------------------------ execute

    def checked_overrides(self, label: str) -> Dict[str, Any]:
        """The rendered spec overrides, coerced and validated; a bad one fails the task for good (a retry would
        fail the same way), naming the key, before anything is staged or run. ``label`` starts the message."""
        try:
            overrides = coerce_overrides(self.spec_overrides)
            validate_overrides(self.action, overrides)
        except SpecError as exc:
            raise AirflowFailException(f"{label}: invalid spec override, nothing was staged or run: {exc}") from None
        return overrides

    def execute(self, context: Any) -> Dict[str, Any]:
        ti = context["ti"]
        overrides = self.checked_overrides(self.action)
        self.check_can_run()
        encryption_key = self.encryption_key_source.resolve()
        if encryption_key:
            self.log.info("%s: encrypted models are opened and written with %s", self.action,
                          self.encryption_key_source.describe())
        s3_client_factory = functools.partial(airflow_s3_client_factory, self.aws_conn_id)
        paths = JobPaths.resolve(job=job_id(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1)),
                                 results_root=self.results_root or default_results_root())
        job_overrides = self.build_overrides(overrides, s3_client_factory)
        self.log.info("%s job %s: runs in %s, published to %s", self.action, paths.job_id, paths.local_dir,
                      paths.publish_uri)
        request = JobRequest(action=self.action, overrides=job_overrides, paths=paths, cache_dir=cache_root(),
                             s3_client_factory=s3_client_factory, log=self.log.info, context=context,
                             extra={"task_id": self.task_id}, encryption_key=encryption_key)
        folder = self.launcher.run(request)
        outcome = self.read_outcome(paths, folder, s3_client_factory)
        self.log.info("%s %s: metrics %s; artifacts %s", self.action, outcome["status"], outcome["metrics"],
                      outcome["artifacts"])
        return outcome

    def check_can_run(self) -> None:
        """Raise AirflowSkipException when this worker cannot run the action (see the TensorRT operator)."""

    def build_overrides(self, overrides: Dict[str, Any], s3_client_factory: Any) -> Dict[str, Any]:
        """Planned data sources, then the parent model, then the user's keys; validated as a whole spec."""
        try:
            planned = self.planned_sources(s3_client_factory)
            parent = resolve_parent(self.action, self.parent, choose=self.checkpoint_choose_method,
                                    epoch=self.checkpoint_epoch_number, s3_client_factory=s3_client_factory)
            merged = {**planned, **parent, **overrides_for_action(self.action, overrides)}
            load_spec(self.action, overrides=merged)
        except (SpecError, ParentError) as exc:
            raise AirflowFailException(f"{exc} Nothing was staged or run.") from None
        for key, value in parent.items():
            self.log.info("parent model: %s = %s", key, value)
        return merged

    def planned_sources(self, s3_client_factory: Any) -> Dict[str, Any]:
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
                                        exists=source_exists_checker(s3_client_factory))
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        if self.action != "train":
            planned = {k: v for k, v in planned.items() if k not in _TRAIN_SPLIT_KEYS}
        return planned

    def read_outcome(self, paths: JobPaths, folder: Optional[Path], s3_client_factory: Any) -> Dict[str, Any]:
        """The XCom dict, from the local job folder or (pod jobs) an index of the published one."""
        if folder is not None:
            return job_outcome(action=self.action, job_id=paths.job_id, folder=folder, publish_uri=paths.publish_uri)
        with tempfile.TemporaryDirectory(prefix="m2f-outcome-") as tmp:
            index = build_index(paths.publish_uri, Path(tmp), s3_client_factory)
            return job_outcome(action=self.action, job_id=paths.job_id, folder=index, publish_uri=paths.publish_uri)

    def on_kill(self) -> None:
        """Called from the task's SIGTERM handler: end the job; execute then raises (never a success)."""
        self.launcher.kill()
