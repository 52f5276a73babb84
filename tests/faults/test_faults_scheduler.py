"""Faults under a real scheduler: one Airflow (scheduler with the LocalExecutor, triggerer, dag-processor and
API server as separate processes, SQLite) for the whole module, tiny trainings (2 images, one step an epoch)
started at the same time, every model encrypted with the key of an Airflow connection:

* the worker of a non-deferrable training is killed (SIGKILL to its process and every process under it: the
  task's supervisor, the task runner and the engine) after a checkpoint; the scheduler finds the task's
  heartbeat gone, the retry resumes from the checkpoint;
* the triggerer is killed (SIGKILL) while a deferred training runs and restarted: the job is untouched and
  the task finishes (the scheduler and its workers killed with the triggerer: tests/airflow/test_deferrable.py);
* a scheduled run, a manual run and a backfill of one DAG train on the same data partition at the same time:
  no file is shared between them;
* and the encryption key shows in no task log, process output, XCom, results file or command line of any
  process on the machine while all this runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from airflow_stack import AirflowStack
from fault_support import observed, wait_for
from helpers import make_dataset, tiny_overrides
from mask2former import results
from operators.utils.jobs import job_id
from secret_scan import file_leaks, leaks

pytestmark = pytest.mark.slow

KEY = "sched-Fault/8Lm!granite-plover-19"
WORKER_DAG, DEFERRED_DAG, PARTITION_DAG = "fault_worker_kill", "fault_triggerer_kill", "fault_same_partition"
# the deferred training runs long enough for the fixture to see it deferred and training before killing the triggerer
EPOCHS = {WORKER_DAG: 3, DEFERRED_DAG: 8, PARTITION_DAG: 1}

DAGS = '''
import pendulum
from airflow.sdk import DAG

from operators import Mask2FormerTrainOperator

def train(dag_id, schedule=None, **extra):
    params = {{"spec_overrides": json_overrides[dag_id]}}
    with DAG(dag_id, schedule=schedule, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
             params=params, render_template_as_native_obj=True, max_active_runs=4) as dag:
        Mask2FormerTrainOperator(task_id="train", train_datasets={train!r}, dataset_format="coco_panoptic",
                                 spec_overrides="{{{{ params.spec_overrides }}}}",
                                 encryption_key_conn_id="m2f_fault_key",
                                 **extra)
    return dag

json_overrides = {overrides!r}
worker = train({worker!r}, retries=1, retry_delay=pendulum.duration(seconds=1))
deferred = train({deferred!r}, deferrable=True, check_interval=1)
partition = train({partition!r}, schedule="@daily")
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fault-data"), images=2, val_images=1, size=64)


class CommandLines:
    """Every process's command line on this machine, sampled until stopped; those that show the key kept."""

    def __init__(self, secret: str) -> None:
        self.secret, self.leaking, self.engines = secret, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                line = " ".join(process.info["cmdline"] or [])
                if "mask2former" in line and (" train" in line or "pod_job" in line):
                    self.engines.add(process.info["pid"])
                if leaks(line, self.secret):
                    self.leaking.append(line)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data):
    home = tmp_path_factory.mktemp("airflow-faults")
    dags = home / "dags"
    dags.mkdir()
    overrides = {dag: tiny_overrides(**{"train.num_epochs": epochs, "dataset.train.batch_size": 2})
                 for dag, epochs in EPOCHS.items()}
    (dags / "fault_dags.py").write_text(DAGS.format(train=str(data / "train"), overrides=overrides, worker=WORKER_DAG,
                                                    deferred=DEFERRED_DAG, partition=PARTITION_DAG))
    stack = AirflowStack(home, triggerer=True, extra_env={
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PARALLELISM": "6",
        "AIRFLOW_CONN_M2F_FAULT_KEY": json.dumps({"conn_type": "generic", "password": KEY}),
        # a task whose worker vanished is failed (and retried) after 10 s without heartbeat, not 5 minutes
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
        "MASK2FORMER_RESULTS_ROOT": str(home / "results"),
        "MASK2FORMER_CACHE_DIR": str(home / "cache"),
    })
    jobs: list = []
    stack.jobs = jobs
    try:
        stack.start()
        for dag in EPOCHS:
            stack.wait_dag(dag)
            stack.unpause(dag)
        yield stack
    finally:
        stack.stop()
        for pid in jobs:  # detached job processes this module started, by their id
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


def folder(stack: AirflowStack, dag: str, run_id: str) -> Path:
    return stack.home / "results" / job_id(dag, run_id, "train")


def epochs_done(path: Path) -> int:
    lines = results.read_status(path) if (path / results.STATUS_FILE).is_file() else []
    return max([int(line.get("epoch", 0)) for line in lines if line["status"] == "RUNNING"] or [0])


def engine_of(path: Path):
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "mask2former" in cmdline and "train" in cmdline and any(str(path) in arg for arg in cmdline):
            return process
    return None


def kill_worker(stack: AirflowStack, engine: psutil.Process) -> list:
    """SIGKILL the executor's worker process that runs the task, and every process under it."""
    scheduler = stack.processes["scheduler"].pid
    worker = engine
    while worker.ppid() not in (scheduler, 1, 0):
        worker = psutil.Process(worker.ppid())
    assert worker.ppid() == scheduler, "the engine does not run under one of the scheduler's workers"
    doomed = [worker, *worker.children(recursive=True)]
    names = [" ".join(p.cmdline()[:4]) for p in doomed]
    for process in doomed:
        process.send_signal(signal.SIGKILL)
    return names


@pytest.fixture(scope="module")
def faults(stack, data):
    """Everything at once: the worker kill, the triggerer kill, the three runs on one partition."""
    watch = CommandLines(KEY)
    worker_run = stack.trigger(WORKER_DAG, {})
    deferred_run = stack.trigger(DEFERRED_DAG, {})
    # the partition DAG's scheduled run (created when it was unpaused), a manual run and a backfill
    stack.trigger(PARTITION_DAG, {})
    stack.backfill(PARTITION_DAG, "2024-01-01", "2024-01-01", {})
    outcome = {"worker_run": worker_run, "deferred_run": deferred_run}

    # the triggerer, once the deferred job trains
    deferred = folder(stack, DEFERRED_DAG, deferred_run)
    wait_for(lambda: stack.task_states(DEFERRED_DAG, deferred_run).get("train") == "deferred"
             and epochs_done(deferred) >= 1, 600, "the deferred training did not start", poll=0.5)
    outcome["deferred_pid"] = json.loads((deferred / "_HEARTBEAT").read_text())["pid"]
    stack.jobs.append(outcome["deferred_pid"])
    outcome["triggerer_killed_at_epoch"] = epochs_done(deferred)
    stack.kill("triggerer")
    time.sleep(2)
    outcome["deferred_alive"] = psutil.pid_exists(outcome["deferred_pid"])
    stack.restart("triggerer")

    # the worker, once the non-deferrable training has a checkpoint and trains the next epoch
    worker_folder = folder(stack, WORKER_DAG, worker_run)
    engine = wait_for(lambda: engine_of(worker_folder), 600, "the worker's training did not start", poll=0.2)
    wait_for(lambda: any(worker_folder.glob("model_epoch_001_*.pth")), 600, "no first checkpoint", poll=0.02)
    outcome["killed"] = kill_worker(stack, engine)
    outcome["checkpointed"] = max(c.epoch for c in results.list_checkpoints(worker_folder))
    # an epoch's checkpoint is written just before its "Epoch N done" line: a kill between the two leaves the
    # checkpoint as the proof that the epoch was done
    outcome["epochs_done"] = max(epochs_done(worker_folder), outcome["checkpointed"])
    outcome["killed_at"] = time.time()

    outcome["states"] = {
        WORKER_DAG: stack.wait_run(WORKER_DAG, worker_run, timeout=900),
        DEFERRED_DAG: stack.wait_run(DEFERRED_DAG, deferred_run, timeout=900)}
    wait_for(lambda: {r["run_type"] for r in stack.runs(PARTITION_DAG)} >= {"backfill", "manual", "scheduled"}, 120,
             "the partition DAG lacks a scheduled, manual or backfill run")
    outcome["partition_runs"] = sorted(r["dag_run_id"] for r in stack.runs(PARTITION_DAG))
    outcome["states"][PARTITION_DAG] = [stack.wait_run(PARTITION_DAG, run, timeout=900)
                                        for run in outcome["partition_runs"]]
    watch.stop()
    outcome["watch"] = watch
    return outcome


def test_a_killed_worker_is_retried_and_the_retry_resumes_from_the_last_checkpoint(stack, faults):
    run = faults["worker_run"]
    assert faults["states"][WORKER_DAG] == "success", (stack.task_states(WORKER_DAG, run), stack.tail_logs())
    train = stack.task_instances(WORKER_DAG, run)["train"]
    assert train["try_number"] == 2
    out = folder(stack, WORKER_DAG, run)
    messages = [line.get("message", "") for line in results.read_status(out)]
    resumed = [m for m in messages if m.startswith("Resuming from model_epoch_")]
    assert len(resumed) == 1, messages
    resumed_epoch = int(resumed[0].split("model_epoch_")[1][:3])
    assert resumed_epoch == faults["checkpointed"], (faults["checkpointed"], resumed)  # the newest checkpoint
    lost = faults["epochs_done"] - resumed_epoch  # whole epochs trained after it (less than one interval)
    assert 0 <= lost < 1, (faults["epochs_done"], resumed)
    assert results.read_status(out)[-1]["status"] == "SUCCESS"
    assert max(c.step for c in results.list_checkpoints(out)) == EPOCHS[WORKER_DAG]
    xcom = stack.xcom(WORKER_DAG, run, "train")
    assert xcom["status"] == "SUCCESS" and Path(xcom["artifacts"]["checkpoint"]).is_file()
    observed("kill -9 the worker (non-deferrable) mid-training",
             "SIGKILL to the LocalExecutor worker running the task and every process under it (task runner, "
             f"engine) as epoch {faults['checkpointed']} of {EPOCHS[WORKER_DAG]} is checkpointed",
             f"the scheduler failed the task on its missing heartbeat (10 s timeout) and retried it; try 2 "
             f"resumed from the epoch-{resumed_epoch} checkpoint and finished SUCCESS",
             "the part of the epoch in progress, less than the checkpoint interval (1 epoch); no file")


def test_a_killed_triggerer_leaves_the_deferred_training_untouched(stack, faults):
    run = faults["deferred_run"]
    assert faults["deferred_alive"] is True
    assert faults["states"][DEFERRED_DAG] == "success", (stack.task_states(DEFERRED_DAG, run), stack.tail_logs())
    out = folder(stack, DEFERRED_DAG, run)
    beat = json.loads((out / "_HEARTBEAT").read_text())
    assert beat["pid"] == faults["deferred_pid"] and beat["exit_code"] == 0  # one job process throughout
    started = [line for line in results.read_status(out) if line["status"] == "STARTED"]
    assert len(started) == 1 and max(c.step for c in results.list_checkpoints(out)) == EPOCHS[DEFERRED_DAG]
    assert stack.xcom(DEFERRED_DAG, run, "train")["status"] == "SUCCESS"
    observed("kill the triggerer while a deferrable training runs",
             f"SIGKILL to the triggerer (its process group) at epoch {faults['triggerer_killed_at_epoch']} of "
             f"{EPOCHS[DEFERRED_DAG]}; restarted 2 s later",
             "the job process kept running (same pid, started once); the restarted triggerer took the trigger "
             "over and the task finished SUCCESS with all epochs", "0")


def test_runs_and_a_backfill_on_one_partition_share_no_file(stack, faults):
    runs = faults["partition_runs"]
    assert len(runs) >= 3 and faults["states"][PARTITION_DAG] == ["success"] * len(runs)
    files = {}
    for run in runs:
        out = folder(stack, PARTITION_DAG, run)
        assert (out / "_FINISHED").is_file() and results.read_status(out)[-1]["status"] == "SUCCESS"
        files[run] = {p.resolve() for p in out.rglob("*") if p.is_file()}
        xcom = stack.xcom(PARTITION_DAG, run, "train")
        assert Path(xcom["results_dir"]) == out
    for first in runs:
        for second in runs:
            if first < second:
                assert not files[first] & files[second], (first, second)
    inodes = [{p.stat().st_ino for p in paths} for paths in files.values()]
    assert sum(map(len, inodes)) == len(set().union(*inodes))  # no hard link between two runs' files either
    kinds = sorted(run.split("__")[0] for run in runs)
    observed("two runs and a backfill on the same partition at once",
             f"{len(runs)} runs of one DAG ({', '.join(kinds)}) training on the same data at the same time",
             f"{len(runs)} separate results folders (keyed by run id), each SUCCESS with `_FINISHED`; no path "
             "and no inode shared between them (the staging cache is shared read-only)", "0")


def test_the_key_shows_in_no_log_xcom_results_file_or_command_line(stack, faults):
    watch = faults["watch"]
    assert watch.engines, "no engine process was seen, so no command line was scanned"
    assert watch.leaking == []
    logs = list((stack.home / "logs").rglob("*.log*"))
    assert logs and file_leaks(stack.home / "logs", KEY) == {}
    for name in stack.processes:  # the scheduler's, triggerer's, dag-processor's and API server's output
        assert not leaks((stack.home / f"{name}.out").read_bytes(), KEY), name
    assert file_leaks(stack.home / "results", KEY) == {}
    for dag, run in ((WORKER_DAG, faults["worker_run"]), (DEFERRED_DAG, faults["deferred_run"]),
                     *((PARTITION_DAG, r) for r in faults["partition_runs"])):
        assert not leaks(json.dumps(stack.xcom(dag, run, "train")), KEY)
    checkpoint = folder(stack, WORKER_DAG, faults["worker_run"]) / results.LATEST_CHECKPOINT
    from mask2former import crypto

    assert crypto.is_encrypted(checkpoint)  # the key did reach the engine
    print(f"key scan: {len(logs)} task log files, {len(stack.processes)} process outputs, "
          f"{len(faults['partition_runs']) + 2} XCom values, {len(watch.engines)} engine processes' command lines")
