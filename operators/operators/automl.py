"""AutoML operators: one search flow (plan, trials, select), split by role.

* **plan** (:class:`Mask2FormerAutoMLPlanOperator`): checks the request and the spec once, creates the Optuna
  study and the search folder, returns the plan every trial worker reads;
* **trials** (:class:`Mask2FormerAutoMLTrialsOperator`, mapped over worker slots): one slot's share of the
  trials, each staged on its worker, trained as a subprocess, published under the search folder;
* **select** (:class:`Mask2FormerAutoMLSelectOperator`): writes the trials table and plot, removes other
  trials' checkpoints when asked, returns the best trial in the TRAIN XCom shape;
* the branch on the AutoML policy (:class:`Mask2FormerAutoMLPolicyOperator`) and the join
  (:class:`Mask2FormerAutoMLResultOperator`), wired as a task group by ``dags/mask2former_automl.py``;
* :class:`Mask2FormerAutoMLOperator`: the same plan and select in one task, its trials in local worker
  processes (``parallel_trials``), or plain training when the policy says so.

Trials share one Optuna study (SQLite in the search folder on one machine, PostgreSQL through
``study_storage_conn_id`` across machines) with Optuna's heartbeat: a trial whose worker died is failed once
its heartbeat is stale and retried (``RetryFailedTrialCallback``), so none stays RUNNING without an owner.
Encrypted models: ``encryption_key_conn_id`` / ``encryption_key_variable`` reach every trial's train job
through its environment. Nothing heavy at import: optuna and the engine's search code load at execute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from mask2former.automl import policy as policy_lib
from mask2former.data.sources import join_uri, local_path_of, uri_scheme

from ..hooks.storage import Mask2FormerStorageHook
from ..links.job import Mask2FormerJobLink
from ..utils.encryption import EncryptionKeyArguments
from ..utils.jobs import cache_root, process_env, work_root
from ..utils.outcome import model_event_extra, published_outcome
from .actions import Mask2FormerTrainOperator

ALGORITHMS = ("bayesian", "hyperband", "random")
DECISION_KEY = "automl_decision"
#: The AutoML settings every AutoML operator takes (templated, e.g. from DAG params).
SETTING_FIELDS = ("automl_policy", "algorithm", "max_recommendations", "max_epochs", "reduction_factor",
                  "add_parameters", "remove_parameters", "custom_ranges", "cleanup_non_best", "study_storage")
#: Never handed to a trial's training: Airflow's settings and secrets, cloud credentials.
_TRIAL_ENV_DROP = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__", "AWS_")


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


def resolve_storage(study_storage: Optional[str], study_storage_conn_id: Optional[str]) -> Optional[str]:
    """The study's storage URL: the connection's (secrets stay in Airflow), else ``study_storage``, else None
    (SQLite in the search folder). postgres:// becomes postgresql+psycopg2://."""
    if not study_storage_conn_id:
        return study_storage or None
    from airflow.sdk import Connection

    scheme, sep, rest = Connection.get(study_storage_conn_id).get_uri().partition("://")
    return f"{'postgresql+psycopg2' if scheme in ('postgres', 'postgresql') else scheme}{sep}{rest}"


def search_local_dir(search_job: str, publish_uri: str) -> Path:
    """Where a search folder lives on this worker: the published folder itself, or under the work root (S3)."""
    if uri_scheme(publish_uri) == "s3":
        return (work_root() / search_job).absolute()
    return Path(local_path_of(publish_uri)).absolute()


def _plan_of(plan: Any) -> Any:
    """The engine's SearchPlan of a plan XCom, its folder on this worker."""
    from mask2former.automl.search import SearchPlan

    if not isinstance(plan, Mapping) or "plan" not in plan:
        raise AirflowFailException(f"plan must be the XCom of the AutoML plan task, got {plan!r}.")
    search = SearchPlan(**plan["plan"])
    search.search_dir = str(search_local_dir(plan["job_id"], plan["publish_uri"]))
    Path(search.search_dir).mkdir(parents=True, exist_ok=True)
    return search


def select_best(plan: Mapping[str, Any], hook: Mask2FormerStorageHook, log: Any) -> Dict[str, Any]:
    """The select role: close the search (trials left RUNNING by dead workers are failed once their heartbeat
    is stale), write its report, publish the search folder, return the best trial in the TRAIN XCom shape."""
    from mask2former.automl.search import SearchError, finish_search

    search = _plan_of(plan)
    publish_uri = plan["publish_uri"]
    try:
        found = finish_search(search, storage_url=resolve_storage(None, plan.get("study_storage_conn_id")),
                              cleanup_non_best=bool(plan.get("cleanup_non_best")),
                              remove_checkpoints=hook.remove_checkpoints, log=log)
    except SearchError as exc:
        raise AirflowFailException(f"automl: {exc}") from None
    finally:
        hook.publish(Path(search.search_dir), publish_uri, log=log)
    trial = f"trials/{Path(str(found.best['results_dir'])).name}"  # published with the search folder, or on its own
    outcome = published_outcome(hook, action="train", job_id=f"{plan['job_id']}/{trial}",
                                publish_uri=join_uri(publish_uri, trial))
    outcome["automl"] = {
        "search_dir": publish_uri, "study_name": search.study_name, "algorithm": search.settings["algorithm"],
        "best_trial": found.best["number"], "best_value": found.best["value"], "metric": "mIoU",
        "best_parameters": found.best["parameters"], "trials": len(found.rows), "counts": found.counts,
        "summary": {name: join_uri(publish_uri, Path(path).name) for name, path in found.files.items()}}
    log(f"AutoML chose trial {found.best['number']} (mIoU {found.best['value']:.4f}): {outcome['results_dir']}")
    return outcome


def decision_summary(decision: Mapping[str, Any], search: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    block = {"policy": decision["policy"], "policy_source": decision["source"], "used": decision["use_automl"],
             "runnable": decision["runnable"], "reason": decision["reason"]}
    return {**block, **(search or {})}


class _AutoMLRequest(Mask2FormerTrainOperator):
    """The AutoML arguments, the policy decision and the plan role (shared by the plan and one-task operators)."""

    template_fields: Sequence[str] = tuple(Mask2FormerTrainOperator.template_fields) + SETTING_FIELDS
    ui_color = "#ffd166"
    ui_fgcolor = "#000000"

    def __init__(self, *, automl_policy: Any = None, algorithm: Any = "bayesian", max_recommendations: Any = 8,
                 max_epochs: Any = 10, reduction_factor: Any = 3, add_parameters: Any = None,
                 remove_parameters: Any = None, custom_ranges: Any = None, cleanup_non_best: Any = False,
                 study_storage: Any = None, study_storage_conn_id: Optional[str] = None, seed: int = 1234,
                 schemas_root: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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

    def plan_search(self, context: Any, *, workers: int, stage: bool) -> Dict[str, Any]:
        """The plan role: the spec checked once, the study and the search folder created; the plan's XCom.
        ``stage``: make the data local here (for local worker processes, which reach no connection)."""
        from mask2former.automl.search import SearchSettings, plan_search
        from mask2former.config import SpecError

        overrides = self.job_spec()
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
        paths = self.job_paths(context)
        storage = resolve_storage(self.study_storage, self.study_storage_conn_id)
        if storage is None and paths.publishes_to_s3 and not stage:
            self.log.warning("study storage: SQLite in %s works only while every trial worker runs on this machine; "
                             "give study_storage_conn_id (PostgreSQL) for workers on several machines.",
                             paths.local_dir)
        if stage:
            overrides = self.hook.stage(overrides, cache_root(), log=self.log.info).local_overrides
        try:
            plan = plan_search(search_dir=paths.local_dir, settings=settings.check(), overrides=overrides,
                               storage_url=storage, study_name=f"mask2former-{paths.job_id.replace('/', '-')}",
                               root=Path(self.schemas_root) if self.schemas_root else None, log=self.log.info)
        except (SpecError, policy_lib.AutoMLConfigError) as exc:
            raise AirflowFailException(f"automl: {exc} Nothing was staged or run.") from None
        self.log.info("AutoML search %s: %s trial(s) of %s epoch(s) over %s worker slot(s); folder %s",
                      plan.study_name, settings.max_recommendations, settings.max_epochs, workers, paths.publish_uri)
        return {"job_id": paths.job_id, "publish_uri": paths.publish_uri, "plan": plan.to_dict(),
                "study_storage_conn_id": self.study_storage_conn_id,
                "cleanup_non_best": _as_bool(self.cleanup_non_best, "cleanup_non_best")}


class Mask2FormerAutoMLPlanOperator(_AutoMLRequest):
    """The plan role of a search whose trials run as ``worker_slots`` mapped tasks (no GPU: the trials train)."""

    wants_gpu = False

    def __init__(self, *, worker_slots: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker_slots = worker_slots

    def execute(self, context: Any) -> Dict[str, Any]:
        return self.plan_search(context, workers=int(self.worker_slots), stage=False)


class Mask2FormerAutoMLTrialsOperator(EncryptionKeyArguments, BaseOperator):
    """The trials role: one worker slot's share of the trials (map it over the slots), one after another.

    A failed trial is recorded FAIL and the slot goes on; the task itself fails only when it is stopped or
    the study cannot be reached.
    """

    template_fields: Sequence[str] = ("plan", "slot")
    ui_color = "#ffd166"

    def __init__(self, *, plan: Any, slot: Any, aws_conn_id: Optional[str] = "aws_default", poll_s: float = 1.0,
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
        from mask2former.automl.search import run_worker
        from mask2former.automl.trial import TrialRunner
        from mask2former.crypto import KEY_ENV

        search = _plan_of(self.plan)
        slot = _as_int(self.slot, "slot")
        hook = Mask2FormerStorageHook(aws_conn_id=self.aws_conn_id)
        key = self.encryption_key_source.resolve()
        env = process_env(os.environ, drop=_TRIAL_ENV_DROP + (KEY_ENV,))
        self._runner = TrialRunner(env={**env, KEY_ENV: key} if key else env, poll_s=self.poll_s, log=self.log.info)
        publish_uri = self.plan["publish_uri"]
        outcomes = run_worker(
            search, slot, storage_url=resolve_storage(None, self.plan.get("study_storage_conn_id")),
            stage=lambda overrides: hook.stage(overrides, cache_root(), log=self.log.info).local_overrides,
            runner=self._runner, publish_root=publish_uri if uri_scheme(publish_uri) == "s3" else None,
            publish=lambda folder, uri: hook.publish(folder, uri, log=self.log.info), log=self.log.info)
        if self._runner.killed:
            raise AirflowException(f"AutoML worker slot {slot} was stopped; its running trial was recorded FAIL.")
        return {"slot": slot, "trials": [{"number": o.number, "state": o.state, "value": o.value} for o in outcomes]}

    def on_kill(self) -> None:
        if self._runner is not None:
            self._runner.kill()


class Mask2FormerAutoMLSelectOperator(BaseOperator):
    """The select role: the trials table and plot, cleanup, and the best trial in the TRAIN XCom shape."""

    template_fields: Sequence[str] = ("plan",)
    ui_color = "#ffd166"

    def __init__(self, *, plan: Any, aws_conn_id: Optional[str] = "aws_default", **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done_min_one_success")
        super().__init__(**kwargs)
        self.plan = plan
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> Dict[str, Any]:
        return select_best(self.plan, Mask2FormerStorageHook(aws_conn_id=self.aws_conn_id), self.log.info)


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


class Mask2FormerAutoMLResultOperator(BaseOperator):
    """The training stage's result: the chosen trial (AutoML) or the direct training, in the TRAIN XCom shape,
    plus ``automl`` (policy, its source, whether AutoML ran and why, and the search summary when it did)."""

    ui_color = "#76b900"
    ui_fgcolor = "#ffffff"
    operator_extra_links = (Mask2FormerJobLink(),)

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
        outcome = {**outcome, "automl": decision_summary(decision, outcome.get("automl"))}
        self.link_to(outcome)
        for asset in self.outlets:  # e.g. Asset("mask2former_model"): the event carries the model and its run
            context["outlet_events"][asset].extra = model_event_extra(
                outcome, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                reason="trained (AutoML search)" if decision["use_automl"] else "trained")
        self.log.info("training result from %s: %s; AutoML: %s", source, outcome["results_dir"],
                      outcome["automl"]["reason"])
        return outcome

    def link_to(self, outcome: Dict[str, Any]) -> None:
        """Point this task's job link at the chosen job (the link is computed once the task has run)."""
        job, folder = outcome.get("job_id"), str(outcome.get("results_dir") or "")
        if job and folder.rstrip("/").endswith("/" + job):
            self.linked_job_id = job
            self.results_root = folder.rstrip("/")[:-len(job) - 1]


class Mask2FormerAutoMLOperator(_AutoMLRequest):
    """Train through a hyper-parameter search in one task: the plan and select roles here, the trials in
    ``parallel_trials`` local worker processes. Policy off (or schemas not generated): plain training, like
    :class:`Mask2FormerTrainOperator`. Returns the TRAIN XCom shape of the chosen model plus ``automl``."""

    template_fields: Sequence[str] = tuple(_AutoMLRequest.template_fields) + ("parallel_trials",)

    def __init__(self, *, parallel_trials: Any = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parallel_trials = parallel_trials
        self._workers: Any = None
        self._stopped = False

    def execute(self, context: Any) -> Dict[str, Any]:
        decision = self.decision()
        self.log.info("AutoML policy %s (from %s): %s", decision.policy, decision.source, decision.reason)
        if not decision.use_automl:
            return {**super().execute(context), "automl": decision_summary(decision.as_dict())}
        from mask2former.automl.search import LocalWorkers
        from mask2former.crypto import KEY_ENV

        plan = self.plan_search(context, workers=_as_int(self.parallel_trials, "parallel_trials"), stage=True)
        key = self.encryption_key_source.resolve()
        env = process_env(os.environ, drop=_TRIAL_ENV_DROP + (KEY_ENV,))
        self._workers = LocalWorkers(_plan_of(plan), storage_url=resolve_storage(self.study_storage,
                                                                                  self.study_storage_conn_id),
                                     env={**env, KEY_ENV: key} if key else env, log=self.log.info).start()
        codes = self._workers.wait()
        if self._stopped:
            raise AirflowException("the AutoML search was stopped; running trials were recorded FAIL.")
        if any(codes):
            self.log.warning("worker exit codes %s (see worker_*.log in the search folder)", codes)
        outcome = select_best(plan, self.hook, self.log.info)
        return {**outcome, "automl": decision_summary(decision.as_dict(), outcome["automl"])}

    def execute_complete(self, context: Any, event: Dict[str, Any], pod: Optional[Dict[str, Any]] = None
                         ) -> Dict[str, Any]:
        """Plain training that was deferred (policy off): its XCom with the decision."""
        return {**super().execute_complete(context, event, pod), "automl": decision_summary(self.decision().as_dict())}

    def on_kill(self) -> None:
        self._stopped = True
        if self._workers is not None:
            self._workers.kill()
        super().on_kill()


__all__ = ["DECISION_KEY", "Mask2FormerAutoMLOperator", "Mask2FormerAutoMLPlanOperator",
           "Mask2FormerAutoMLPolicyOperator", "Mask2FormerAutoMLResultOperator", "Mask2FormerAutoMLSelectOperator",
           "Mask2FormerAutoMLTrialsOperator", "decision_summary", "resolve_storage", "select_best"]
