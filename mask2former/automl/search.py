"""A whole search: plan it, run trials from one or several workers, choose the best.

The search folder::

    automl_plan.json     the plan every worker reads (settings, search space, base spec, study)
    study.db             the Optuna study (SQLite storage; absent with PostgreSQL)
    status.json          the search's own status lines (STARTED, one RUNNING line per trial, SUCCESS)
    trials/trial_NNN/    one train results folder per trial (spec.yaml, train.log, checkpoints, ...)
    trials.csv, trials.json, metric_per_trial.png, best_trial.json    written when the search ends
    metrics.json         best mIoU and trial counts

Workers share the budget by slot: worker ``slot`` of ``workers`` runs a fixed quota of the
``max_recommendations`` trials (the first ``max_recommendations % workers`` slots take one more), so
no two workers race for the last trial and a retried worker only runs the part of its quota that is
not finished. A trial left RUNNING by a worker that died stops beating (Optuna's heartbeat): it is failed
once stale and queued again once (:mod:`.study`); its retry counts in the quota, the orphan does not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from mask2former import results
from mask2former.config import SpecError, load_spec, resolve_spec_dict, spec_to_dict
from mask2former.data.sources import join_uri

from . import policy as automl_policy
from .search_space import SearchSpace, SearchSpaceError, build_search_space, flatten
from .study import (HEARTBEAT_GRACE_S, HEARTBEAT_INTERVAL_S, MONITOR_METRIC, check_algorithm, create_study, heartbeat_calls,
                    load_study, open_storage, redact_url, retrying, sqlite_url)
from .summary import best_trial_record, trial_rows, write_summary
from .trial import TrialOutcome, TrialRunner, tell

PLAN_FILE = "automl_plan.json"
TRIALS_DIR = "trials"
BEST_FILE = "best_trial.json"
#: Keys AutoML sets on every trial (the epoch budget is the search's, not the spec's).
EPOCHS_KEY = "train.num_epochs"

Log = Callable[[str], None]
Stage = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class SearchError(RuntimeError):
    """A search that cannot go on (no trial completed, a plan that does not exist, ...)."""


@dataclass
class SearchSettings:
    """What the user chooses about a search (operator arguments, CLI flags)."""

    algorithm: str = "bayesian"
    max_recommendations: int = 8
    max_epochs: int = 10
    reduction_factor: int = 3
    seed: int = 1234
    workers: int = 1
    add_parameters: List[str] = field(default_factory=list)
    remove_parameters: List[str] = field(default_factory=list)
    custom_ranges: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def check(self) -> "SearchSettings":
        check_algorithm(self.algorithm)
        for name in ("max_recommendations", "max_epochs", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise automl_policy.AutoMLConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.algorithm == "hyperband" and (not isinstance(self.reduction_factor, int) or self.reduction_factor < 2):
            raise automl_policy.AutoMLConfigError(f"reduction_factor must be an integer >= 2, got "
                                                  f"{self.reduction_factor!r}.")
        return self


@dataclass
class SearchPlan:
    """Everything a worker needs, written to ``automl_plan.json`` (no secrets: the storage URL is redacted)."""

    search_dir: str
    study_name: str
    storage_url: str
    settings: Dict[str, Any]
    space: Dict[str, Any]
    base_spec: Dict[str, Any]
    overrides: Dict[str, Any]
    created: str = ""

    @property
    def search_settings(self) -> SearchSettings:
        return SearchSettings(**self.settings)

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, search_dir: Path) -> "SearchPlan":
        path = Path(search_dir) / PLAN_FILE
        if not path.is_file():
            raise SearchError(f"no AutoML plan at {path}; the planning step writes it.")
        return cls(**json.loads(path.read_text()))

    def write(self) -> None:
        results.write_json(Path(self.search_dir) / PLAN_FILE, self.to_dict())


def quota(slot: int, workers: int, max_recommendations: int) -> int:
    """How many trials worker ``slot`` runs."""
    if not 0 <= slot < workers:
        raise automl_policy.AutoMLConfigError(f"worker slot {slot} is outside 0..{workers - 1}.")
    return max_recommendations // workers + (1 if slot < max_recommendations % workers else 0)


def trial_dir(search_dir: Path, number: int) -> Path:
    return Path(search_dir) / TRIALS_DIR / f"trial_{number:03d}"


def _check_base(config: Any, settings: SearchSettings) -> None:
    if not config.dataset.val.img_dir:
        raise automl_policy.AutoMLConfigError(
            "AutoML scores trials by validation mIoU and needs a validation split: set eval_dataset (or "
            "dataset.val.*).")
    if config.train.validation_interval > settings.max_epochs:
        raise automl_policy.AutoMLConfigError(
            f"train.validation_interval {config.train.validation_interval} exceeds the trial budget max_epochs "
            f"{settings.max_epochs}: trials would never be validated.")


def plan_search(*, search_dir: Path, settings: SearchSettings, base_spec: Optional[Mapping[str, Any]] = None,
                overrides: Optional[Mapping[str, Any]] = None, storage_url: Optional[str] = None,
                study_name: Optional[str] = None, root: Optional[Path] = None, log: Log = print) -> SearchPlan:
    """Validate the request, build the search space, create the study and write the plan.

    ``overrides`` may still hold data URIs (each worker stages them); ``storage_url`` None means SQLite
    in ``search_dir``. Raises :class:`SpecError` or :class:`AutoMLConfigError` naming what is wrong
    before any trial starts.
    """
    settings.check()
    search_dir = Path(search_dir).absolute()
    base_spec = dict(base_spec or {})
    overrides = dict(overrides or {})
    if EPOCHS_KEY in overrides:
        log(f"{EPOCHS_KEY}={overrides[EPOCHS_KEY]} is replaced by the AutoML budget max_epochs={settings.max_epochs}")
    overrides[EPOCHS_KEY] = settings.max_epochs
    config = load_spec("train", spec=base_spec, overrides=overrides)
    _check_base(config, settings)
    schema = automl_policy.read_train_schema(root)
    info = automl_policy.read_skill_info(root)
    if schema is None or info is None:
        raise automl_policy.AutoMLConfigError(
            f"AutoML needs {automl_policy.TRAIN_SCHEMA_FILE} and {automl_policy.SKILL_INFO_FILE}; generate them "
            f"with `{automl_policy.GENERATE_COMMAND}`.")
    base_values = flatten(spec_to_dict("train", config))
    space = build_search_space(schema, info, add=settings.add_parameters, remove=settings.remove_parameters,
                               custom_ranges=settings.custom_ranges, base_values=base_values)
    search_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url or sqlite_url(search_dir)
    name = study_name or f"mask2former-{search_dir.name}"
    create_study(study_name=name, storage_url=url, algorithm=settings.algorithm, seed=settings.seed,
                 max_recommendations=settings.max_recommendations, max_epochs=settings.max_epochs,
                 reduction_factor=settings.reduction_factor)
    plan = SearchPlan(search_dir=str(search_dir), study_name=name, storage_url=redact_url(url),
                      settings=asdict(settings), space=space.to_dict(), base_spec=base_spec, overrides=overrides,
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    plan.write()
    status = results.StatusWriter(search_dir)
    status.started(f"AutoML search planned: {settings.algorithm}, {settings.max_recommendations} trial(s) of "
                   f"{settings.max_epochs} epoch(s) over {len(space.parameters)} parameter(s), {settings.workers} "
                   f"worker(s), study {name} in {redact_url(url)}")
    for line in space.describe():
        log(f"search space: {line}")
    return plan


def open_plan_study(plan: SearchPlan, *, storage_url: Optional[str] = None, slot: int = 0) -> optuna.Study:
    """The plan's study with a sampler seeded for ``slot`` (parallel workers must not draw the same points)."""
    settings = plan.search_settings
    return load_study(study_name=plan.study_name, storage_url=storage_url or plan.storage_url,
                      algorithm=settings.algorithm, seed=settings.seed + 7919 * slot,
                      max_recommendations=settings.max_recommendations, max_epochs=settings.max_epochs,
                      reduction_factor=settings.reduction_factor)


def _trials(study: optuna.Study) -> List[optuna.trial.FrozenTrial]:
    return retrying(lambda: study.get_trials(deepcopy=False), what="list trials")


def _slot_trials(study: optuna.Study, slot: int) -> List[optuna.trial.FrozenTrial]:
    return [t for t in _trials(study) if t.user_attrs.get("slot") == slot]


def run_worker(plan: SearchPlan, slot: int, *, storage_url: Optional[str] = None, stage: Optional[Stage] = None,
               runner: Optional[TrialRunner] = None, publish_root: Optional[str] = None,
               publish: Optional[Callable[[Path, str], None]] = None, log: Log = print) -> List[TrialOutcome]:
    """Run worker ``slot``'s quota of trials (minus those an earlier attempt finished).

    ``stage`` makes the plan's data URIs local (default: used as they are). With ``publish_root`` (the
    search folder's published URI, e.g. on S3) each trial is recorded at ``<publish_root>/trials/trial_NNN``
    and ``publish(local folder, uri)`` copies it there when it ends; without, the local folder is the record.
    A trial that fails is recorded FAIL and the worker goes on with the next.
    """
    settings = plan.search_settings
    study = open_plan_study(plan, storage_url=storage_url, slot=slot)
    storage = open_storage(storage_url or plan.storage_url)  # the study's own (one per process and URL)
    runner = runner or TrialRunner(log=log)
    with heartbeat_calls():
        retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in _trials(study)}
    done = [t for t in _slot_trials(study, slot) if t.state.is_finished() and t.number not in retried]
    remaining = quota(slot, settings.workers, settings.max_recommendations) - len(done)
    if remaining <= 0:
        log(f"slot {slot}: its quota is already done")
        return []
    staged = dict(stage(plan.overrides) if stage else plan.overrides)
    base_values = flatten(resolve_spec_dict("train", spec=plan.base_spec, overrides=staged))
    space = plan.search_space
    status = results.StatusWriter(plan.search_dir)
    outcomes = []
    for _ in range(remaining):
        if runner.killed:
            break
        with heartbeat_calls():
            retrying(lambda: optuna.storages.fail_stale_trials(study), what="fail trials whose worker died", log=log)
            trial = retrying(study.ask, what="start a trial", log=log)  # a retried (WAITING) trial comes first
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(plan.study_name),
                                                                   trial.number)
        storage.record_heartbeat(trial_id)  # from its first moment, so a worker killed now leaves no orphan
        retrying(lambda: trial.set_user_attr("slot", slot), what="record the trial's slot")
        folder = trial_dir(Path(plan.search_dir), trial.number)
        record = join_uri(publish_root, f"{TRIALS_DIR}/{folder.name}") if publish_root else str(folder)
        outcome = run_one(plan, study, trial, space=space, staged=staged, base_values=base_values, runner=runner,
                          record=record, log=log, heartbeat=lambda: storage.record_heartbeat(trial_id))
        if publish is not None and publish_root:
            publish(folder, record)
        outcome.results_dir = record
        outcomes.append(outcome)
        status.running(f"trial {outcome.number} {outcome.state}: {outcome.message}", kpi=(
            {MONITOR_METRIC: outcome.value} if outcome.value is not None else None))
        log(f"trial {outcome.number} {outcome.state} in {outcome.seconds:.1f} s: {outcome.message}")
    return outcomes


def run_one(plan: SearchPlan, study: optuna.Study, trial: optuna.Trial, *, space: SearchSpace,
            staged: Mapping[str, Any], base_values: Mapping[str, Any], runner: TrialRunner, record: str,
            log: Log, heartbeat: Optional[Callable[[], None]] = None) -> TrialOutcome:
    """Sample, validate and train one trial; a sample the spec refuses is told FAIL with the loader's message.

    ``record`` is where the trial's folder is published (its ``results_dir`` in the study).
    """
    folder = trial_dir(Path(plan.search_dir), trial.number)
    retrying(lambda: trial.set_user_attr("results_dir", record), what="record the trial folder")
    try:
        sampled = space.sample(trial, base_values)
        retrying(lambda: trial.set_user_attr("overrides", sampled), what="record the trial's parameters")
        config = load_spec("train", spec=plan.base_spec, overrides={**staged, **sampled})
    except (SpecError, SearchSpaceError) as error:
        outcome = TrialOutcome(number=trial.number, state="FAIL", value=None, results_dir=str(folder),
                               message=f"sampled spec refused: {error}")
        tell(study, trial, outcome)
        return outcome
    tree = spec_to_dict("train", config)
    tree["results_dir"] = str(folder)
    log(f"trial {trial.number}: " + ", ".join(f"{k}={_short(v)}" for k, v in sampled.items()))
    return runner.run(study, trial, spec_tree=tree, trial_dir=folder, overrides=sampled, heartbeat=heartbeat)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class SearchResult:
    """The chosen trial and where the summary lies."""

    best: Dict[str, Any]
    rows: List[Dict[str, Any]]
    files: Dict[str, str]
    counts: Dict[str, int]


def close_orphans(study: optuna.Study, log: Log) -> List[optuna.trial.FrozenTrial]:
    """The study's trials once none is RUNNING: every worker has ended, so a RUNNING trial lost its worker;
    Optuna fails it when its heartbeat is stale (waited for, at most the grace period and two beats)."""
    deadline = time.monotonic() + HEARTBEAT_GRACE_S + 2 * HEARTBEAT_INTERVAL_S
    while True:
        with heartbeat_calls():
            retrying(lambda: optuna.storages.fail_stale_trials(study), what="fail trials whose worker died", log=log)
        trials = _trials(study)
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if not running or time.monotonic() > deadline:
            break
        log(f"trial(s) {running} still RUNNING without a worker: waiting for their heartbeat to go stale")
        time.sleep(HEARTBEAT_INTERVAL_S / 2)
    return trials


def finish_search(plan: SearchPlan, *, storage_url: Optional[str] = None, cleanup_non_best: bool = False,
                  remove_checkpoints: Optional[Callable[[str], int]] = None, log: Log = print) -> SearchResult:
    """Close trials left RUNNING (:func:`close_orphans`), write the summary, choose the best COMPLETE trial by
    mIoU, clean up.

    ``cleanup_non_best`` deletes the ``.pth`` files of every other trial through ``remove_checkpoints``
    (results_dir -> number of files removed; default: local folders).
    """
    study = open_plan_study(plan, storage_url=storage_url)
    trials = close_orphans(study, log)
    rows = trial_rows(trials)
    search_dir = Path(plan.search_dir)
    files = write_summary(rows, search_dir, metric=MONITOR_METRIC)
    counts = {state: sum(1 for r in rows if r["state"] == state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    status = results.StatusWriter(search_dir)
    best = best_trial_record(rows)
    if best is None:
        message = (f"no trial completed ({counts['PRUNED']} pruned, {counts['FAIL']} failed); see "
                   f"{files['trials_csv']}")
        status.failure(message)
        raise SearchError(message)
    results.write_json(search_dir / BEST_FILE, best)
    removed = 0
    if cleanup_non_best:
        remove = remove_checkpoints or remove_local_checkpoints
        removed = sum(remove(r["results_dir"]) for r in rows if r["number"] != best["number"] and r["results_dir"])
        log(f"removed {removed} checkpoint file(s) of the {len(rows) - 1} other trial(s)")
    metrics = {MONITOR_METRIC: best["value"], "best_trial": best["number"], "trials": len(rows),
               "complete": counts["COMPLETE"], "pruned": counts["PRUNED"], "failed": counts["FAIL"],
               "removed_checkpoints": removed}
    results.write_metrics(search_dir, metrics)
    status.success(f"AutoML search done: best trial {best['number']} {MONITOR_METRIC} {best['value']:.4f} "
                   f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed)",
                   kpi={MONITOR_METRIC: best["value"]})
    return SearchResult(best=best, rows=rows, files={k: str(v) for k, v in files.items()}, counts=counts)


def remove_local_checkpoints(results_dir: str) -> int:
    """Delete the checkpoint files (``*.pth``) of a local trial folder; returns how many."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return 0
    doomed = sorted(folder.glob("*.pth"))
    for path in doomed:
        path.unlink()
    return len(doomed)


STORAGE_ENV = "MASK2FORMER_AUTOML_STORAGE"


class LocalWorkers:
    """The plan's workers as local processes (``python -m mask2former.automl worker``), each in its own group.

    A storage URL with a password reaches the workers through ``MASK2FORMER_AUTOML_STORAGE``, never
    their command line. ``kill`` sends SIGTERM to every worker group (a worker then stops its trial).
    """

    def __init__(self, plan: SearchPlan, *, storage_url: Optional[str] = None, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, log: Log = print):
        from .trial import default_env

        self.plan = plan
        self.python = python or sys.executable
        self.env = dict(env or default_env())
        if storage_url:
            self.env[STORAGE_ENV] = storage_url
        self.log = log
        self.processes: List[subprocess.Popen] = []

    def start(self) -> "LocalWorkers":
        search_dir = Path(self.plan.search_dir)
        for slot in range(self.plan.search_settings.workers):
            log_path = search_dir / f"worker_{slot}.log"
            with open(log_path, "ab") as fh:
                self.processes.append(subprocess.Popen(
                    [self.python, "-m", "mask2former.automl", "worker", "--search-dir", str(search_dir),
                     "--slot", str(slot)], stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                    start_new_session=True))
            self.log(f"worker {slot} started (pid {self.processes[-1].pid}, log {log_path.name})")
        return self

    def wait(self) -> List[int]:
        return [p.wait() for p in self.processes]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_local_search(plan: SearchPlan, *, storage_url: Optional[str] = None, log: Log = print) -> List[int]:
    """Run every worker of the plan locally and wait; their exit codes."""
    return LocalWorkers(plan, storage_url=storage_url, log=log).start().wait()


__all__ = ["LocalWorkers", "PLAN_FILE", "STORAGE_ENV", "SearchError", "SearchPlan", "SearchResult", "SearchSettings",
           "finish_search", "plan_search", "quota", "remove_local_checkpoints", "run_local_search", "run_worker",
           "trial_dir"]
