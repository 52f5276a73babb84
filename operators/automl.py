"""AutoML in Airflow: training routed through a hyper-parameter search, trials fanned out as mapped tasks.

Two ways to use it:

* :func:`automl_training` builds the training stage of a pipeline::

      training.policy ─► training.automl_plan ─► training.automl_trials[0..W-1] ─► training.automl_select ─┐
            └────────► training.direct_train ──────────────────────────────────────────────────────┴─► train

  ``policy`` branches on the AutoML policy (``automl_policy`` of specs/skill_info.yaml, overridden per
  run by the operator argument / DAG param; off, or schemas not generated: direct training, with the
  reason in the log and in the XCom). ``automl_plan`` validates the request, creates the study and
  the search folder. ``automl_trials`` is mapped over worker slots (``.expand(slot=...)``) in a pool
  that caps the GPUs; each slot runs its share of ``max_recommendations`` trials, all sharing one
  Optuna study (SQLite in the search folder on one machine, PostgreSQL through ``study_storage`` /
  ``study_storage_conn_id`` across machines). ``automl_select`` writes the trials table and plot,
  removes the other trials' checkpoints when asked and returns the best trial. The join task
  (``train`` by default) returns the TRAIN XCom shape (``action``, ``job_id``, ``results_dir``,
  ``status``, ``metrics``, ``artifacts``), plus an ``automl`` block, so evaluate/export downstream
  take the chosen model unchanged.

* :class:`Mask2FormerAutoMLOperator` runs a whole search in one task (``parallel_trials`` local worker
  processes), or plain training when the policy says so; same XCom.

Nothing heavy at import: optuna and the engine's search code are imported at execute time.

Encrypted models: ``encryption_key_conn_id`` / ``encryption_key_variable`` (see :mod:`operators.encryption`)
reach every trial's train job through its environment, like a single train task's.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.sdk import BaseOperator, Param, TaskGroup
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from mask2former.automl import policy as policy_lib
from mask2former.data.sources import join_uri, local_path_of, parse_s3_uri, uri_scheme
from mask2former.data.staging import airflow_s3_client_factory, stage_sources, sync_results

from .base import Mask2FormerBaseOperator
from .encryption import EncryptionKeyArguments
from .jobs import JobPaths, cache_root, default_results_root, job_id, work_root
from .launchers import engine_env
from .mask2former_operators import Mask2FormerTrainOperator
from .outcome import job_outcome
from .remote import build_index, list_published

ALGORITHMS = ("bayesian", "hyperband", "random")
DEFAULT_POOL = "mask2former_gpu"
DECISION_KEY = "automl_decision"
#: The AutoML settings every AutoML operator takes (templated, e.g. from DAG params).
SETTING_FIELDS = ("automl_policy", "algorithm", "max_recommendations", "max_epochs", "reduction_factor",
                  "add_parameters", "remove_parameters", "custom_ranges", "cleanup_non_best", "study_storage")


# --------------------------------------------------------------------------------------------- helpers


def _as_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise AirflowFailException(f"{name} must be an integer, got {value!r}.") from None
    if isinstance(value, float) and value != number:
        raise AirflowFailException(f"{name} must be an integer, got {value!r}.")
    return number


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise AirflowFailException(f"{name} must be true or false, got {value!r}.")


def _as_list(value: Any, name: str) -> List[str]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AirflowFailException(f"{name} must be a list of dotted train keys, got {value!r}.")


def storage_url_from_connection(conn_id: str) -> str:
    """A SQLAlchemy URL from an Airflow connection (postgres:// becomes postgresql+psycopg2://)."""
    from airflow.sdk import Connection

    uri = Connection.get(conn_id).get_uri()
    scheme, sep, rest = uri.partition("://")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg2"
    return f"{scheme}{sep}{rest}"


def resolve_storage(study_storage: Optional[str], study_storage_conn_id: Optional[str]) -> Optional[str]:
    """The study's storage URL: the connection's (secrets stay in Airflow), else ``study_storage``, else None."""
    if study_storage_conn_id:
        return storage_url_from_connection(study_storage_conn_id)
    return study_storage or None


def search_local_dir(search_job: str, publish_uri: str) -> Path:
    """Where a search folder lives on this worker: the published folder itself, or under the work root (S3)."""
    if uri_scheme(publish_uri) == "s3":
        return (work_root() / search_job).absolute()
    return Path(local_path_of(publish_uri)).absolute()


def remove_published_checkpoints(results_dir: str, s3_client_factory: Callable[[], Any]) -> int:
    """Delete the ``.pth`` files of a published trial folder (local path or S3 prefix); returns how many."""
    from mask2former.automl.search import remove_local_checkpoints

    if uri_scheme(results_dir) != "s3":
        return remove_local_checkpoints(results_dir)
    location = parse_s3_uri(results_dir)
    prefix = f"{location.key.rstrip('/')}/"
    doomed = [name for name in list_published(results_dir, s3_client_factory) if name.endswith(".pth")]
    client = s3_client_factory()
    for start in range(0, len(doomed), 1000):
        client.delete_objects(Bucket=location.bucket, Delete={
            "Objects": [{"Key": prefix + name} for name in doomed[start:start + 1000]], "Quiet": True})
    return len(doomed)


def best_trial_outcome(*, best: Mapping[str, Any], search_job: str, s3_client_factory: Callable[[], Any]
                       ) -> Dict[str, Any]:
    """The best trial's results folder in the TRAIN XCom shape."""
    results_dir = str(best["results_dir"])
    trial_job = f"{search_job}/trials/{Path(results_dir.rstrip('/')).name}"
    with tempfile.TemporaryDirectory(prefix="m2f-automl-") as tmp:
        folder = build_index(results_dir, Path(tmp), s3_client_factory)
        return job_outcome(action="train", job_id=trial_job, folder=folder, publish_uri=results_dir)


# ------------------------------------------------------------------------------------------ the mixin


class _AutoMLSettings:
    """The AutoML arguments shared by the operators, turned into the engine's SearchSettings at execute."""

    def _init_settings(self, *, automl_policy: Any, algorithm: Any, max_recommendations: Any, max_epochs: Any,
                       reduction_factor: Any, add_parameters: Any, remove_parameters: Any, custom_ranges: Any,
                       cleanup_non_best: Any, study_storage: Any, study_storage_conn_id: Optional[str], seed: int,
                       schemas_root: Optional[str]) -> None:
        self.automl_policy = automl_policy
        self.algorithm = algorithm
        self.max_recommendations = max_recommendations
        self.max_epochs = max_epochs
        self.reduction_factor = reduction_factor
        self.add_parameters = add_parameters
        self.remove_parameters = remove_parameters
        self.custom_ranges = custom_ranges
        self.cleanup_non_best = cleanup_non_best
        self.study_storage = study_storage
        self.study_storage_conn_id = study_storage_conn_id
        self.seed = seed
        self.schemas_root = schemas_root
        if isinstance(algorithm, str) and "{{" not in algorithm and algorithm not in ALGORITHMS:
            raise ValueError(f"{type(self).__name__}: algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        if isinstance(automl_policy, str) and "{{" not in automl_policy and automl_policy \
                and automl_policy.strip().lower() not in policy_lib.POLICIES:
            raise ValueError(f"{type(self).__name__}: automl_policy {automl_policy!r} is not one of "
                             f"{', '.join(policy_lib.POLICIES)}.")

    def decision(self) -> policy_lib.PolicyDecision:
        try:
            return policy_lib.decide("train", override=self.automl_policy or None, root=self.schemas_root)
        except policy_lib.AutoMLConfigError as exc:
            raise AirflowFailException(str(exc)) from None

    def search_settings(self, workers: int) -> Any:
        from mask2former.automl.search import SearchSettings

        ranges = self.custom_ranges or {}
        if not isinstance(ranges, Mapping):
            raise AirflowFailException(f"custom_ranges must map dotted train keys to ranges, got {ranges!r}.")
        settings = SearchSettings(
            algorithm=str(self.algorithm), max_recommendations=_as_int(self.max_recommendations, "max_recommendations"),
            max_epochs=_as_int(self.max_epochs, "max_epochs"),
            reduction_factor=_as_int(self.reduction_factor, "reduction_factor"), seed=int(self.seed), workers=workers,
            add_parameters=_as_list(self.add_parameters, "add_parameters"),
            remove_parameters=_as_list(self.remove_parameters, "remove_parameters"),
            custom_ranges={str(k): dict(v) if isinstance(v, Mapping) else v for k, v in ranges.items()})
        try:
            return settings.check()
        except policy_lib.AutoMLConfigError as exc:
            raise AirflowFailException(str(exc)) from None


def _decision_summary(decision: Mapping[str, Any], search: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    block = {"policy": decision["policy"], "policy_source": decision["source"], "used": decision["use_automl"],
             "runnable": decision["runnable"], "reason": decision["reason"]}
    if search:
        block.update(search)
    return block


# --------------------------------------------------------------------------------------- the task group


class Mask2FormerAutoMLPolicyOperator(BaseBranchOperator):
    """Branch: the AutoML plan when the policy is auto and runnable, else direct training.

    The decision (policy, its source, whether AutoML is used and why) is logged and pushed as the XCom
    key ``automl_decision``; the model metadata file is only read.
    """

    template_fields: Sequence[str] = ("automl_policy",)
    ui_color = "#ffd166"

    def __init__(self, *, automl_task_id: str, direct_task_id: str, automl_policy: Any = None,
                 schemas_root: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automl_task_id = automl_task_id
        self.direct_task_id = direct_task_id
        self.automl_policy = automl_policy
        self.schemas_root = schemas_root

    def choose_branch(self, context: Any) -> str:
        try:
            decision = policy_lib.decide("train", override=self.automl_policy or None, root=self.schemas_root)
        except policy_lib.AutoMLConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        self.log.info("AutoML policy %s (from %s): %s", decision.policy, decision.source, decision.reason)
        context["ti"].xcom_push(key=DECISION_KEY, value=decision.as_dict())
        return self.automl_task_id if decision.use_automl else self.direct_task_id


class Mask2FormerAutoMLPlanOperator(_AutoMLSettings, Mask2FormerBaseOperator):
    """Validate the search, create its study and folder; returns the plan every trial worker reads."""

    action = "train"
    template_fields: Sequence[str] = tuple(Mask2FormerBaseOperator.template_fields) + SETTING_FIELDS
    ui_color = "#ffd166"
    ui_fgcolor = "#000000"

    def __init__(self, *, worker_slots: int, automl_policy: Any = None, algorithm: Any = "bayesian",
                 max_recommendations: Any = 8, max_epochs: Any = 10, reduction_factor: Any = 3,
                 add_parameters: Any = None, remove_parameters: Any = None, custom_ranges: Any = None,
                 cleanup_non_best: Any = False, study_storage: Any = None, study_storage_conn_id: Optional[str] = None,
                 seed: int = 1234, schemas_root: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker_slots = worker_slots
        self._init_settings(automl_policy=automl_policy, algorithm=algorithm, max_recommendations=max_recommendations,
                            max_epochs=max_epochs, reduction_factor=reduction_factor, add_parameters=add_parameters,
                            remove_parameters=remove_parameters, custom_ranges=custom_ranges,
                            cleanup_non_best=cleanup_non_best, study_storage=study_storage,
                            study_storage_conn_id=study_storage_conn_id, seed=seed, schemas_root=schemas_root)

    def execute(self, context: Any) -> Dict[str, Any]:
        from mask2former.automl.search import plan_search
        from mask2former.config import SpecError

        ti = context["ti"]
        overrides = self.checked_overrides("automl")
        settings = self.search_settings(workers=int(self.worker_slots))
        s3_client_factory = functools.partial(airflow_s3_client_factory, self.aws_conn_id)
        job_overrides = self.build_overrides(overrides, s3_client_factory)
        search_job = job_id(ti.dag_id, ti.run_id, ti.task_id)
        paths = JobPaths.resolve(job=search_job, results_root=self.results_root or default_results_root())
        storage = resolve_storage(self.study_storage, self.study_storage_conn_id)
        if storage is None and paths.publishes_to_s3:
            self.log.warning("study storage: SQLite in %s works only while every trial worker runs on this machine; "
                             "give study_storage_conn_id (PostgreSQL) for workers on several machines.",
                             paths.local_dir)
        try:
            plan = plan_search(search_dir=paths.local_dir, settings=settings, overrides=job_overrides,
                               storage_url=storage, study_name=f"mask2former-{search_job.replace('/', '-')}",
                               root=Path(self.schemas_root) if self.schemas_root else None, log=self.log.info)
        except (SpecError, policy_lib.AutoMLConfigError) as exc:
            raise AirflowFailException(f"automl: {exc} Nothing was staged or run.") from None
        self.log.info("AutoML search %s: %s trial(s) of %s epoch(s) over %s worker slot(s); folder %s",
                      plan.study_name, settings.max_recommendations, settings.max_epochs, settings.workers,
                      paths.publish_uri)
        return {"job_id": search_job, "publish_uri": paths.publish_uri, "plan": plan.to_dict(),
                "study_storage_conn_id": self.study_storage_conn_id,
                "cleanup_non_best": _as_bool(self.cleanup_non_best, "cleanup_non_best")}


class Mask2FormerAutoMLTrialsOperator(EncryptionKeyArguments, BaseOperator):
    """One worker slot of a search (map it over the slots): its share of the trials, one after another.

    Each trial's data is staged on this worker (cached), its train job runs as a subprocess followed
    through status.json (pruned when the pruner says so), and its folder is published under the
    search folder. A failed trial is recorded FAIL and the slot goes on; the task itself fails only
    when it is stopped or the study cannot be reached.
    """

    template_fields: Sequence[str] = ("plan", "slot")
    ui_color = "#ffd166"

    def __init__(self, *, plan: Any, slot: Any, aws_conn_id: str = "aws_default", poll_s: float = 1.0,
                 encryption_key_conn_id: Optional[str] = None, encryption_key_variable: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan
        self.slot = slot
        self.aws_conn_id = aws_conn_id
        self.poll_s = poll_s
        self._init_encryption_key(conn_id=encryption_key_conn_id, variable=encryption_key_variable)
        self._runner: Any = None

    def execute(self, context: Any) -> Dict[str, Any]:
        from mask2former.automl.search import SearchPlan, run_worker
        from mask2former.automl.trial import TrialRunner

        if not isinstance(self.plan, Mapping) or "plan" not in self.plan:
            raise AirflowFailException(f"plan must be the XCom of the AutoML plan task, got {self.plan!r}.")
        slot = _as_int(self.slot, "slot")
        s3_client_factory = functools.partial(airflow_s3_client_factory, self.aws_conn_id)
        search_job, publish_uri = self.plan["job_id"], self.plan["publish_uri"]
        plan = SearchPlan(**self.plan["plan"])
        plan.search_dir = str(search_local_dir(search_job, publish_uri))
        storage = resolve_storage(None, self.plan.get("study_storage_conn_id"))
        key = self.encryption_key_source.resolve()
        self._runner = TrialRunner(env=engine_env(encryption_key=key), poll_s=self.poll_s, log=self.log.info)

        def stage(overrides: Mapping[str, Any]) -> Mapping[str, Any]:
            return stage_sources(overrides, cache_root(), s3_client_factory=s3_client_factory,
                                 progress=self.log.info).local_overrides

        def publish(trial_dir: Path, uri: str) -> None:
            sync_results(trial_dir, uri, s3_client_factory=s3_client_factory)

        remote = publish_uri if uri_scheme(publish_uri) == "s3" else None
        outcomes = run_worker(plan, slot, storage_url=storage, stage=stage, runner=self._runner, publish_root=remote,
                              publish=publish, log=self.log.info)
        if self._runner.killed:
            raise AirflowException(f"AutoML worker slot {slot} was stopped; its running trial was recorded FAIL.")
        return {"slot": slot, "trials": [{"number": o.number, "state": o.state, "value": o.value} for o in outcomes]}

    def on_kill(self) -> None:
        if self._runner is not None:
            self._runner.kill()


class Mask2FormerAutoMLSelectOperator(BaseOperator):
    """Close the search: trials table and plot, cleanup, and the best trial in the TRAIN XCom shape."""

    template_fields: Sequence[str] = ("plan",)
    ui_color = "#ffd166"

    def __init__(self, *, plan: Any, aws_conn_id: str = "aws_default", **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done_min_one_success")
        super().__init__(**kwargs)
        self.plan = plan
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> Dict[str, Any]:
        from mask2former.automl.search import SearchError, SearchPlan, finish_search

        if not isinstance(self.plan, Mapping) or "plan" not in self.plan:
            raise AirflowFailException(f"plan must be the XCom of the AutoML plan task, got {self.plan!r}.")
        s3_client_factory = functools.partial(airflow_s3_client_factory, self.aws_conn_id)
        search_job, publish_uri = self.plan["job_id"], self.plan["publish_uri"]
        plan = SearchPlan(**self.plan["plan"])
        local = search_local_dir(search_job, publish_uri)
        local.mkdir(parents=True, exist_ok=True)
        plan.search_dir = str(local)
        storage = resolve_storage(None, self.plan.get("study_storage_conn_id"))
        try:
            found = finish_search(plan, storage_url=storage, cleanup_non_best=bool(self.plan.get("cleanup_non_best")),
                                  remove_checkpoints=functools.partial(remove_published_checkpoints,
                                                                       s3_client_factory=s3_client_factory),
                                  log=self.log.info)
        except SearchError as exc:
            raise AirflowFailException(f"automl: {exc}") from None
        finally:
            sync_results(local, publish_uri, s3_client_factory=s3_client_factory)
        outcome = best_trial_outcome(best=found.best, search_job=search_job, s3_client_factory=s3_client_factory)
        outcome["automl"] = {
            "search_dir": publish_uri, "study_name": plan.study_name, "algorithm": plan.settings["algorithm"],
            "best_trial": found.best["number"], "best_value": found.best["value"], "metric": "mIoU",
            "best_parameters": found.best["parameters"], "trials": len(found.rows), "counts": found.counts,
            "summary": {name: join_uri(publish_uri, Path(path).name) for name, path in found.files.items()},
        }
        self.log.info("AutoML chose trial %s (mIoU %.4f): %s", found.best["number"], found.best["value"],
                      outcome["results_dir"])
        return outcome


class Mask2FormerAutoMLResultOperator(BaseOperator):
    """The training stage's result: the chosen trial (AutoML) or the direct training, in the TRAIN XCom shape.

    Adds ``automl`` (policy, its source, whether AutoML ran and why, and the search summary when it did).
    """

    ui_color = "#76b900"
    ui_fgcolor = "#ffffff"

    def __init__(self, *, policy_task_id: str, select_task_id: str, direct_task_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "none_failed_min_one_success")
        super().__init__(**kwargs)
        self.policy_task_id = policy_task_id
        self.select_task_id = select_task_id
        self.direct_task_id = direct_task_id

    def execute(self, context: Any) -> Dict[str, Any]:
        ti = context["ti"]
        decision = ti.xcom_pull(task_ids=self.policy_task_id, key=DECISION_KEY)
        if not decision:
            raise AirflowFailException(f"no AutoML decision from {self.policy_task_id}.")
        source = self.select_task_id if decision["use_automl"] else self.direct_task_id
        outcome = ti.xcom_pull(task_ids=source)
        if not outcome:
            raise AirflowFailException(f"{source} returned no result (policy {decision['policy']}: "
                                       f"{decision['reason']}).")
        outcome = dict(outcome)
        outcome["automl"] = _decision_summary(decision, outcome.get("automl"))
        self.log.info("training result from %s: %s; AutoML: %s", source, outcome["results_dir"],
                      outcome["automl"]["reason"])
        return outcome


@dataclass
class AutoMLTraining:
    """The tasks :func:`automl_training` created; ``output`` is the training stage's XCom (TRAIN shape)."""

    group: TaskGroup
    policy: Mask2FormerAutoMLPolicyOperator
    direct_train: Mask2FormerTrainOperator
    plan: Mask2FormerAutoMLPlanOperator
    trials: Any
    select: Mask2FormerAutoMLSelectOperator
    result: Mask2FormerAutoMLResultOperator

    @property
    def output(self) -> Any:
        return self.result.output


def automl_training(*, group_id: str = "training", result_task_id: str = "train", worker_slots: int = 2,
                    pool: Optional[str] = DEFAULT_POOL, automl_policy: Any = None, algorithm: Any = "bayesian",
                    max_recommendations: Any = 8, max_epochs: Any = 10, reduction_factor: Any = 3,
                    add_parameters: Any = None, remove_parameters: Any = None, custom_ranges: Any = None,
                    cleanup_non_best: Any = False, study_storage: Any = None,
                    study_storage_conn_id: Optional[str] = None, seed: int = 1234,
                    schemas_root: Optional[str] = None, aws_conn_id: str = "aws_default",
                    **job_kwargs: Any) -> AutoMLTraining:
    """The training stage of a pipeline: AutoML search or direct training, chosen per run (see the module doc).

    ``job_kwargs`` are the arguments every Mask2Former operator takes (spec_overrides,
    train_datasets, eval_dataset, dataset_format, results_root, ...). ``worker_slots`` trials run in
    parallel (mapped tasks in ``pool``: create it with as many slots as GPUs, e.g. ``airflow pools set
    mask2former_gpu 2 "GPUs for training"``; the scheduler does not run tasks of a pool that does not exist).
    """
    if worker_slots < 1:
        raise ValueError(f"worker_slots must be >= 1, got {worker_slots}")
    pool_args = {"pool": pool} if pool else {}
    with TaskGroup(group_id=group_id, tooltip="AutoML search or direct training") as group:
        direct = Mask2FormerTrainOperator(task_id="direct_train", aws_conn_id=aws_conn_id, **job_kwargs)
        plan = Mask2FormerAutoMLPlanOperator(
            task_id="automl_plan", worker_slots=worker_slots, automl_policy=automl_policy, algorithm=algorithm,
            max_recommendations=max_recommendations, max_epochs=max_epochs, reduction_factor=reduction_factor,
            add_parameters=add_parameters, remove_parameters=remove_parameters, custom_ranges=custom_ranges,
            cleanup_non_best=cleanup_non_best, study_storage=study_storage,
            study_storage_conn_id=study_storage_conn_id, seed=seed, schemas_root=schemas_root,
            aws_conn_id=aws_conn_id, **job_kwargs)
        policy = Mask2FormerAutoMLPolicyOperator(task_id="policy", automl_policy=automl_policy,
                                                 schemas_root=schemas_root, automl_task_id=plan.task_id,
                                                 direct_task_id=direct.task_id)
        key_source = {name: job_kwargs[name] for name in ("encryption_key_conn_id", "encryption_key_variable")
                      if name in job_kwargs}
        trials = Mask2FormerAutoMLTrialsOperator.partial(
            task_id="automl_trials", plan=plan.output, aws_conn_id=aws_conn_id, **key_source, **pool_args,
        ).expand(slot=list(range(worker_slots)))
        select = Mask2FormerAutoMLSelectOperator(task_id="automl_select", plan=plan.output, aws_conn_id=aws_conn_id)
        policy >> [plan, direct]
        trials >> select
    result = Mask2FormerAutoMLResultOperator(task_id=result_task_id, policy_task_id=policy.task_id,
                                             select_task_id=select.task_id, direct_task_id=direct.task_id)
    [select, direct] >> result
    return AutoMLTraining(group=group, policy=policy, direct_train=direct, plan=plan, trials=trials, select=select,
                          result=result)


# ---------------------------------------------------------------------------------- the one-task operator


class Mask2FormerAutoMLOperator(_AutoMLSettings, Mask2FormerBaseOperator):
    """Train through a hyper-parameter search in one task (``parallel_trials`` local worker processes).

    Policy off (or schemas not generated): plain training, like :class:`Mask2FormerTrainOperator`.
    Returns the TRAIN XCom shape of the chosen model plus an ``automl`` block.
    """

    action = "train"
    template_fields: Sequence[str] = tuple(Mask2FormerBaseOperator.template_fields) + SETTING_FIELDS + (
        "parallel_trials",)
    ui_color = "#ffd166"
    ui_fgcolor = "#000000"

    def __init__(self, *, automl_policy: Any = None, algorithm: Any = "bayesian", max_recommendations: Any = 8,
                 max_epochs: Any = 10, reduction_factor: Any = 3, parallel_trials: Any = 1, add_parameters: Any = None,
                 remove_parameters: Any = None, custom_ranges: Any = None, cleanup_non_best: Any = False,
                 study_storage: Any = None, study_storage_conn_id: Optional[str] = None, seed: int = 1234,
                 schemas_root: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parallel_trials = parallel_trials
        self._init_settings(automl_policy=automl_policy, algorithm=algorithm, max_recommendations=max_recommendations,
                            max_epochs=max_epochs, reduction_factor=reduction_factor, add_parameters=add_parameters,
                            remove_parameters=remove_parameters, custom_ranges=custom_ranges,
                            cleanup_non_best=cleanup_non_best, study_storage=study_storage,
                            study_storage_conn_id=study_storage_conn_id, seed=seed, schemas_root=schemas_root)
        self._workers: Any = None
        self._stopped = False

    def execute(self, context: Any) -> Dict[str, Any]:
        decision = self.decision()
        self.log.info("AutoML policy %s (from %s): %s", decision.policy, decision.source, decision.reason)
        if not decision.use_automl:
            outcome = super().execute(context)
            outcome["automl"] = _decision_summary(decision.as_dict())
            return outcome
        return self._search(context, decision)

    def _search(self, context: Any, decision: policy_lib.PolicyDecision) -> Dict[str, Any]:
        from mask2former.automl.search import LocalWorkers, SearchError, finish_search, plan_search
        from mask2former.config import SpecError

        ti = context["ti"]
        overrides = self.checked_overrides("automl")
        settings = self.search_settings(workers=_as_int(self.parallel_trials, "parallel_trials"))
        s3_client_factory = functools.partial(airflow_s3_client_factory, self.aws_conn_id)
        job_overrides = self.build_overrides(overrides, s3_client_factory)
        search_job = job_id(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
        paths = JobPaths.resolve(job=search_job, results_root=self.results_root or default_results_root())
        staged = stage_sources(job_overrides, cache_root(), s3_client_factory=s3_client_factory,
                               progress=self.log.info).local_overrides
        storage = resolve_storage(self.study_storage, self.study_storage_conn_id)
        try:
            plan = plan_search(search_dir=paths.local_dir, settings=settings, overrides=staged, storage_url=storage,
                               study_name=f"mask2former-{search_job.replace('/', '-')}",
                               root=Path(self.schemas_root) if self.schemas_root else None, log=self.log.info)
        except (SpecError, policy_lib.AutoMLConfigError) as exc:
            raise AirflowFailException(f"automl: {exc}") from None
        env = engine_env(encryption_key=self.encryption_key_source.resolve())
        self._workers = LocalWorkers(plan, storage_url=storage, env=env, log=self.log.info).start()
        codes = self._workers.wait()
        if self._stopped:
            raise AirflowException("the AutoML search was stopped; running trials were recorded FAIL.")
        if any(codes):
            self.log.warning("worker exit codes %s (see worker_*.log in %s)", codes, paths.local_dir)
        try:
            found = finish_search(plan, storage_url=storage,
                                  cleanup_non_best=_as_bool(self.cleanup_non_best, "cleanup_non_best"),
                                  log=self.log.info)
        except SearchError as exc:
            raise AirflowFailException(f"automl: {exc}") from None
        finally:
            sync_results(paths.local_dir, paths.publish_uri, s3_client_factory=s3_client_factory)
        best_uri = join_uri(paths.publish_uri, f"trials/{Path(found.best['results_dir']).name}")
        outcome = best_trial_outcome(best={**found.best, "results_dir": best_uri}, search_job=search_job,
                                     s3_client_factory=s3_client_factory)
        outcome["automl"] = _decision_summary(decision.as_dict(), {
            "search_dir": paths.publish_uri, "study_name": plan.study_name, "algorithm": settings.algorithm,
            "best_trial": found.best["number"], "best_value": found.best["value"], "metric": "mIoU",
            "best_parameters": found.best["parameters"], "trials": len(found.rows), "counts": found.counts})
        return outcome

    def on_kill(self) -> None:
        self._stopped = True
        if self._workers is not None:
            self._workers.kill()
        super().on_kill()


# ------------------------------------------------------------------------------------------- DAG params


def automl_params(*, schemas_root: Optional[str] = None) -> Dict[str, Param]:
    """Trigger-form params of the AutoML training stage (section "AutoML").

    ``automl_policy`` defaults to the model's policy (specs/skill_info.yaml); choosing another value
    changes this run only.
    """
    try:
        info = policy_lib.read_skill_info(schemas_root) or {}
        default_policy = policy_lib.check_policy(info.get("automl_policy", policy_lib.DEFAULT_POLICY),
                                                 where=policy_lib.SKILL_INFO_FILE)
    except policy_lib.AutoMLConfigError:
        default_policy = policy_lib.DEFAULT_POLICY  # the first task reports the broken file
    section = "AutoML"
    return {
        "automl_policy": Param(default_policy, type="string", enum=list(policy_lib.POLICIES), section=section,
                               title="AutoML policy",
                               description="auto: train through a hyper-parameter search (when the schemas are "
                                           "generated); off: train once with the given spec. This run only."),
        "automl_algorithm": Param("bayesian", type="string", enum=list(ALGORITHMS), section=section,
                                  title="Search algorithm",
                                  description="bayesian (TPE), hyperband (TPE + early stopping on epochs) or random."),
        "automl_max_recommendations": Param(8, type="integer", minimum=1, maximum=500, section=section,
                                            title="Trials", description="Number of trials of the search."),
        "automl_max_epochs": Param(10, type="integer", minimum=1, section=section, title="Epochs per trial",
                                   description="Training epochs of each trial (replaces train.num_epochs)."),
        "automl_reduction_factor": Param(3, type="integer", minimum=2, section=section,
                                         title="Hyperband reduction factor",
                                         description="Hyperband keeps 1/reduction_factor of the trials per rung."),
        "automl_remove_parameters": Param([], type="array", items={"type": "string"}, section=section,
                                          title="Parameters left out",
                                          description="Default search keys to keep at the spec's value."),
        "automl_cleanup_non_best": Param(False, type="boolean", section=section, title="Remove other trials' "
                                                                                     "checkpoints",
                                         description="Delete the checkpoints of every trial but the chosen one."),
        "automl_custom_ranges": Param({}, type="object", section=section, title="Custom ranges",
                                      description="Dotted train key -> {valid_min, valid_max} or {valid_options, "
                                                  "option_weights}, optional math_cond ('/ 8', '^ 2') and log_scale; "
                                                  "a key not searched by default is added."),
    }


#: Operator arguments wired to :func:`automl_params` (render_template_as_native_obj DAGs).
AUTOML_PARAM_ARGS = {
    "automl_policy": "{{ params.automl_policy }}",
    "algorithm": "{{ params.automl_algorithm }}",
    "max_recommendations": "{{ params.automl_max_recommendations }}",
    "max_epochs": "{{ params.automl_max_epochs }}",
    "reduction_factor": "{{ params.automl_reduction_factor }}",
    "remove_parameters": "{{ params.automl_remove_parameters }}",
    "custom_ranges": "{{ params.automl_custom_ranges }}",
    "cleanup_non_best": "{{ params.automl_cleanup_non_best }}",
}


__all__ = ["AUTOML_PARAM_ARGS", "AutoMLTraining", "DEFAULT_POOL", "Mask2FormerAutoMLOperator",
           "Mask2FormerAutoMLPlanOperator", "Mask2FormerAutoMLPolicyOperator", "Mask2FormerAutoMLResultOperator",
           "Mask2FormerAutoMLSelectOperator", "Mask2FormerAutoMLTrialsOperator", "automl_params", "automl_training"]
