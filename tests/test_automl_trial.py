"""Trials and workers on a shared study: status following, pruning (the process is killed), failures,
retried slots, parallel workers on SQLite and PostgreSQL.

Training here is the scripted stand-in of tests/automl_support.py (same status.json contract as the train
CLI, mIoU a known function of the learning rate), so each test takes seconds; real training runs in
tests/test_automl_search.py and tests/airflow/test_automl_pipeline.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from automl_support import FIXED_SIZES, SMALL_RANGES, stand_in_command, stand_in_miou, tiny_spec, write_stand_in
from mask2former import results
from mask2former.automl.search import (SearchSettings, finish_search, open_plan_study, plan_search, quota,
                                       run_worker)
from mask2former.automl.study import make_pruner, make_sampler, redact_url
from mask2former.automl.trial import TrialRunner, validation_point
from mask2former.config import resolve_spec_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def stand_in(tmp_path) -> Path:
    return write_stand_in(tmp_path)


def runner_for(stand_in: Path, *, epoch_s: float = 0.1, **env) -> TrialRunner:
    full_env = {**os.environ, "STAND_IN_EPOCH_S": str(epoch_s), **{k: str(v) for k, v in env.items()}}
    return TrialRunner(command=stand_in_command(stand_in), env=full_env, poll_s=0.02, log=lambda _: None)


def fake_roots(tmp_path: Path):
    return {"train": tmp_path / "data" / "train", "val": tmp_path / "data" / "val"}


def spec_tree(tmp_path: Path, *, lr: float, epochs: int, folder: Path):
    tree = resolve_spec_dict("train", spec=tiny_spec(fake_roots(tmp_path)),
                             overrides={"train.optim.lr": lr, "train.num_epochs": epochs})
    tree["results_dir"] = str(folder)
    return tree


def test_validation_points_are_running_lines_with_epoch_and_miou():
    assert validation_point({"status": "RUNNING", "epoch": 2, "kpi": {"mIoU": 41.5, "PQ": 3.0}}) == (2, 41.5)
    assert validation_point({"status": "RUNNING", "epoch": 2, "kpi": {"loss": 0.3}}) is None
    assert validation_point({"status": "SUCCESS", "epoch": 2, "kpi": {"mIoU": 41.5}}) is None
    assert validation_point({"status": "RUNNING", "kpi": {"mIoU": 41.5}}) is None
    assert validation_point({"status": "RUNNING", "epoch": 1, "kpi": {"mIoU": float("nan")}}) is None


def test_a_pruned_trial_is_killed_mid_training_and_recorded_pruned(tmp_path, stand_in):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=20.0))
    runner = runner_for(stand_in, epoch_s=0.4)
    folder = tmp_path / "bad"
    began = time.monotonic()
    outcome = runner.run(study, study.ask(), spec_tree=spec_tree(tmp_path, lr=1e-5, epochs=6, folder=folder),
                         trial_dir=folder, overrides={"train.optim.lr": 1e-5})
    assert time.monotonic() - began < 6 * 0.4  # stopped long before its six epochs
    assert outcome.state == "PRUNED" and outcome.value is None
    assert outcome.history == [(1, stand_in_miou(1e-5, 1))]
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert study.trials[0].user_attrs["message"].startswith("pruned by AutoML after epoch 1")
    lines = results.read_status(folder)
    assert lines[-1]["status"] == "FAILURE" and "pruned" in lines[-1]["message"]
    assert not any(line["status"] == "SUCCESS" for line in lines)
    assert max(line.get("epoch", 0) for line in lines) == 1  # the process never wrote epoch 2

    good = tmp_path / "good"
    outcome = runner.run(study, study.ask(), spec_tree=spec_tree(tmp_path, lr=1e-3, epochs=2, folder=good),
                         trial_dir=good, overrides={"train.optim.lr": 1e-3})
    assert outcome.state == "COMPLETE" and outcome.value == pytest.approx(stand_in_miou(1e-3, 2))
    assert study.trials[1].value == pytest.approx(outcome.value)


def test_the_last_epoch_is_never_pruned(tmp_path, stand_in):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=20.0))
    folder = tmp_path / "one_epoch"
    outcome = runner_for(stand_in).run(study, study.ask(), spec_tree=spec_tree(tmp_path, lr=1e-5, epochs=1,
                                                                               folder=folder),
                                       trial_dir=folder, overrides={})
    assert outcome.state == "COMPLETE" and outcome.value == pytest.approx(stand_in_miou(1e-5, 1))


def plan_in(tmp_path: Path, *, algorithm="random", trials=4, epochs=2, workers=1, storage_url=None,
            study_name=None, reduction_factor=2):
    settings = SearchSettings(algorithm=algorithm, max_recommendations=trials, max_epochs=epochs, workers=workers,
                              reduction_factor=reduction_factor, seed=3, remove_parameters=list(FIXED_SIZES),
                              custom_ranges=dict(SMALL_RANGES))
    return plan_search(search_dir=tmp_path / "search", settings=settings, base_spec=tiny_spec(fake_roots(tmp_path)),
                       storage_url=storage_url, study_name=study_name, log=lambda _: None)


def test_a_failed_trial_is_recorded_and_the_worker_goes_on(tmp_path, stand_in):
    plan = plan_in(tmp_path, trials=3, epochs=1)
    study = open_plan_study(plan)
    for lr in (2e-3, 5e-4, 2.5e-3):  # the stand-in fails above 1e-3
        study.enqueue_trial({"train.optim.lr": lr})
    outcomes = run_worker(plan, 0, runner=runner_for(stand_in, STAND_IN_FAIL_ABOVE_LR=1e-3), log=lambda _: None)
    assert [o.state for o in outcomes] == ["FAIL", "COMPLETE", "FAIL"]
    assert "loss is nan (stand-in)" in outcomes[0].message and "exit status 1" in outcomes[0].message
    found = finish_search(plan, log=lambda _: None)
    assert found.best["number"] == 1 and found.counts == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 2}
    rows = json.loads((Path(plan.search_dir) / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "FAIL"]


def test_quotas_split_the_budget_exactly():
    for trials in range(1, 12):
        for workers in range(1, 5):
            shares = [quota(slot, workers, trials) for slot in range(workers)]
            assert sum(shares) == trials and max(shares) - min(shares) <= 1


def test_a_retried_slot_reruns_the_trial_its_killed_attempt_left_and_only_the_rest(tmp_path, stand_in,
                                                                                   monkeypatch):
    from mask2former.automl import search, study as study_lib

    monkeypatch.setattr(study_lib, "HEARTBEAT_GRACE_S", 1)
    monkeypatch.setattr(search, "HEARTBEAT_GRACE_S", 1)
    plan = plan_in(tmp_path, trials=3, epochs=1, study_name="retried-slot")
    study = open_plan_study(plan)
    finished = study.ask()
    finished.set_user_attr("slot", 0)
    study.tell(finished, 12.0)
    storage = study_lib.open_storage(plan.storage_url)
    orphan = study.ask()  # the earlier attempt was killed while this trial ran: its heartbeat stops
    orphan.set_user_attr("slot", 0)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(plan.study_name), orphan.number))
    time.sleep(2.5)
    outcomes = run_worker(plan, 0, runner=runner_for(stand_in), log=lambda _: None)
    assert len(outcomes) == 2
    trials = {t.number: t for t in open_plan_study(plan).trials}
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL  # failed by Optuna's heartbeat check
    retry = next(t for t in trials.values() if t.system_attrs.get("failed_trial") == orphan.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.number in [o.number for o in outcomes]
    assert sum(1 for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE) == 3
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials.values())


def run_parallel_workers(plan, stand_in, storage_url=None):
    """Every slot of the plan in its own thread (each with its own storage connection and trial processes)."""
    errors = []

    def work(slot):
        try:
            run_worker(plan, slot, storage_url=storage_url, runner=runner_for(stand_in, epoch_s=0.05),
                       log=lambda _: None)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(plan.search_settings.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def check_shared_search(plan, trials: int, workers: int, storage_url=None):
    found = finish_search(plan, storage_url=storage_url, log=lambda _: None)
    assert len(found.rows) == trials
    assert sorted(r["number"] for r in found.rows) == list(range(trials))
    assert sorted(r["slot"] for r in found.rows) == sorted(s for s in range(workers)
                                                           for _ in range(quota(s, workers, trials)))
    complete = [r for r in found.rows if r["state"] == "COMPLETE"]
    assert len(complete) == trials
    assert found.best["value"] == max(r["value"] for r in complete)
    assert found.best["value"] == pytest.approx(stand_in_miou(found.best["parameters"]["train.optim.lr"], 2))
    best = json.loads((Path(plan.search_dir) / "best_trial.json").read_text())
    assert best["number"] == found.best["number"]
    assert results.read_status(plan.search_dir)[-1]["status"] == "SUCCESS"
    return found


def test_parallel_workers_share_one_sqlite_study(tmp_path, stand_in):
    plan = plan_in(tmp_path, algorithm="bayesian", trials=6, epochs=2, workers=2)
    assert plan.storage_url == f"sqlite:///{tmp_path / 'search' / 'study.db'}"
    run_parallel_workers(plan, stand_in)
    check_shared_search(plan, trials=6, workers=2)


def test_hyperband_prunes_weak_trials_of_the_shared_study(tmp_path, stand_in):
    plan = plan_in(tmp_path, algorithm="hyperband", trials=10, epochs=4, reduction_factor=2,
                   study_name="hyperband-test")
    assert isinstance(open_plan_study(plan).pruner, optuna.pruners.HyperbandPruner)
    outcomes = run_worker(plan, 0, runner=runner_for(stand_in, epoch_s=0.15), log=lambda _: None)
    pruned = [o for o in outcomes if o.state == "PRUNED"]
    assert pruned, [(o.state, o.history) for o in outcomes]
    for outcome in pruned:
        assert len(outcome.history) < 4  # stopped before the budget
        lines = results.read_status(outcome.results_dir)
        assert lines[-1]["status"] == "FAILURE" and "pruned by AutoML" in lines[-1]["message"]
    found = finish_search(plan, log=lambda _: None)
    assert found.counts["PRUNED"] == len(pruned)
    assert found.best["value"] == max(o.value for o in outcomes if o.state == "COMPLETE")


def test_samplers_and_pruners_per_algorithm():
    assert isinstance(make_sampler("bayesian", seed=1, max_recommendations=8), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("hyperband", seed=1, max_recommendations=8), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", seed=1, max_recommendations=8), optuna.samplers.RandomSampler)
    pruner = make_pruner("hyperband", max_epochs=9, reduction_factor=3)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 9, 3)
    assert isinstance(make_pruner("bayesian", max_epochs=9, reduction_factor=3), optuna.pruners.NopPruner)


def test_storage_urls_are_redacted():
    assert redact_url("postgresql+psycopg2://bob:s3cret@db:5432/automl") == \
        "postgresql+psycopg2://bob:***@db:5432/automl"
    assert redact_url("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"


@pytest.fixture
def postgres_url():
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"m2f_automl_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres ({exc})")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def test_parallel_workers_share_one_postgresql_study(tmp_path, stand_in, postgres_url):
    plan = plan_in(tmp_path, algorithm="bayesian", trials=4, epochs=2, workers=2, storage_url=postgres_url)
    assert not (Path(plan.search_dir) / "study.db").exists()
    run_parallel_workers(plan, stand_in, storage_url=postgres_url)
    found = check_shared_search(plan, trials=4, workers=2, storage_url=postgres_url)
    study = optuna.load_study(study_name=plan.study_name, storage=postgres_url)
    assert study.best_trial.number == found.best["number"]


def test_stopping_the_worker_kills_the_running_trial_and_records_it_failed(tmp_path, stand_in):
    """What Airflow's on_kill does to a trial worker: the training process group ends, the trial is FAIL."""
    plan = plan_in(tmp_path, trials=3, epochs=20)
    runner = runner_for(stand_in, epoch_s=0.3)
    outcomes = []
    worker = threading.Thread(target=lambda: outcomes.extend(run_worker(plan, 0, runner=runner, log=lambda _: None)))
    worker.start()
    folder = Path(plan.search_dir) / "trials" / "trial_000"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(line.get("epoch") for line in results.read_status(folder)):
        time.sleep(0.05)
    runner.kill()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [o.state for o in outcomes] == ["FAIL"]  # the other two trials of the quota never started
    assert outcomes[0].message == "the AutoML worker was stopped; training killed"
    lines = results.read_status(folder)
    assert lines[-1]["status"] == "FAILURE" and max(line.get("epoch", 0) for line in lines) < 20
    assert [t.state for t in open_plan_study(plan).trials] == [optuna.trial.TrialState.FAIL]
