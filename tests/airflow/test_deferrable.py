"""Deferrable jobs under a real scheduler and triggerer: Airflow's scheduler (LocalExecutor with ONE worker slot),
triggerer, dag-processor and API server as separate processes on 127.0.0.1, SQLite metadata, real engine training
on the tiny model, driven through the REST API.

The DAG is the README's deferrable example, copied from README.md into the DAGs folder. Each job runs as a
detached local process: it stands in for a Kubernetes pod, which runs the same job entry point
(``python -m operators.pod_job``) and is followed the same way, through its job folder; no cluster is reachable
here (tests/airflow/test_kubernetes.py checks the pod itself).

* with one worker slot, two deferred trainings run at the same time;
* the scheduler (with its LocalExecutor workers) and the triggerer are killed (SIGKILL) and restarted while both
  are deferred: the trainings keep running, the triggerer re-attaches through the job folders, and both tasks end
  SUCCESS with the train XCom; the timeline (kill, restart, re-attach, training steps lost) is printed;
* marking a deferred task failed stops its job.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from airflow_stack import AirflowStack
from helpers import REPO, make_dataset, tiny_overrides
from mask2former import results
from operators.utils.jobs import job_id
from waiting import wait_for

pytestmark = pytest.mark.slow

DAG_ID = "mask2former_deferred_training"
EPOCHS = 16
STEPS_PER_EPOCH = 2  # 4 training images, batch size 2


def readme_example(after: str) -> str:
    """The first ```python block of README.md after the paragraph starting with ``after``."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("deferred-data"), images=4, val_images=2, size=64)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data):
    home = tmp_path_factory.mktemp("airflow-deferred")
    dags = home / "dags"
    dags.mkdir()
    (dags / "deferred_training.py").write_text(readme_example("**Deferrable mode.**"))
    stack = AirflowStack(home, triggerer=True, extra_env={
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PARALLELISM": "1",  # one worker slot
        # a restarted triggerer takes over the triggers of one that stopped beating for this long (default 30)
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
        "MASK2FORMER_RESULTS_ROOT": str(home / "results"),
        "MASK2FORMER_CACHE_DIR": str(home / "cache"),
    })
    jobs = []
    stack.jobs = jobs
    try:
        stack.start()
        stack.wait_dag(DAG_ID)
        stack.unpause(DAG_ID)
        yield stack
    finally:
        stack.stop()
        for pid in jobs:  # job processes this module started, by their id
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


def conf(data: Path, epochs: int = EPOCHS) -> dict:
    return {"data": str(data), "spec_overrides": tiny_overrides(**{"train.num_epochs": epochs,
                                                                   "train.validation_interval": epochs})}


def folder(stack: AirflowStack, run_id: str) -> Path:
    return stack.home / "results" / job_id(DAG_ID, run_id, "train")


def beat(stack: AirflowStack, run_id: str) -> dict:
    path = folder(stack, run_id) / "_HEARTBEAT"
    return json.loads(path.read_text()) if path.is_file() else {}




def status_times(path: Path, status: str = "RUNNING") -> list:
    return [datetime.fromisoformat(f"{line['date']}T{line['time']}") for line in results.read_status(path)
            if line["status"] == status]


def log_times(log: str, text: str) -> list:
    """POSIX times of the task-log lines holding ``text`` (JSON lines with a ``timestamp``)."""
    found = []
    for raw in log.splitlines():
        if text in raw:
            stamp = re.search(r'"timestamp":\s*"([^"]+)"', raw) or re.search(r"(\d{4}-\d\d-\d\dT[\d:.]+)", raw)
            if stamp:
                found.append(datetime.fromisoformat(stamp.group(1).replace("Z", "+00:00")).timestamp())
    return found


@pytest.fixture(scope="module")
def restarted(stack, data):
    """Two deferred trainings; the scheduler and the triggerer killed and restarted while both are deferred."""
    runs = [stack.trigger(DAG_ID, conf(data)) for _ in range(2)]

    def both_deferred_and_training():
        states = [stack.task_states(DAG_ID, run).get("train") for run in runs]
        return states == ["deferred", "deferred"] and all(status_times(folder(stack, run)) for run in runs)

    wait_for(both_deferred_and_training, 600, "the two trainings were not deferred and training together",
             poll=0.5)
    job_pids = {run: beat(stack, run)["pid"] for run in runs}
    stack.jobs.extend(job_pids.values())
    killed_at = time.time()
    stack.kill("scheduler", "triggerer")
    time.sleep(5)
    alive = {run: psutil.pid_exists(pid) for run, pid in job_pids.items()}
    restarted_at = time.time()
    stack.restart("scheduler", "triggerer")
    stack.wait_healthy(300)
    states = {run: stack.wait_run(DAG_ID, run, timeout=900) for run in runs}
    return {"runs": runs, "states": states, "job_pids": job_pids, "alive": alive,
            "killed_at": killed_at, "restarted_at": restarted_at}


def test_two_deferred_trainings_run_at_the_same_time_in_one_worker_slot(stack, restarted):
    assert stack.env["AIRFLOW__CORE__PARALLELISM"] == "1"
    first, second = (status_times(folder(stack, run)) for run in restarted["runs"])
    assert first and second
    assert first[0] <= second[-1] and second[0] <= first[-1]  # the two trainings overlapped in time


def test_restarting_the_scheduler_and_triggerer_loses_no_training(stack, restarted):
    assert restarted["alive"] == {run: True for run in restarted["runs"]}  # the jobs outlived the kill
    timeline = []
    for run in restarted["runs"]:
        assert restarted["states"][run] == "success", stack.task_states(DAG_ID, run)
        out = folder(stack, run)
        xcom = stack.xcom(DAG_ID, run, "train")
        assert xcom["action"] == "train" and xcom["status"] == "SUCCESS" and xcom["results_dir"] == str(out)
        assert Path(xcom["artifacts"]["checkpoint"]).is_file() and "mIoU" in xcom["metrics"]
        final = beat(stack, run)
        assert final["exit_code"] == 0 and final["pid"] == restarted["job_pids"][run]  # one job process throughout
        lines = results.read_status(out)
        assert [line["message"] for line in lines if line["status"] == "STARTED"] == ["train started"]  # never restarted
        steps = max(c.step for c in results.list_checkpoints(out))
        assert steps == EPOCHS * STEPS_PER_EPOCH
        log = stack.task_log(DAG_ID, run, "train")
        assert "status.json: [RUNNING] Epoch" in log  # the trigger streamed the job's progress into the task log
        reattached = [t for t in log_times(log, "following job") if t > restarted["restarted_at"]]
        assert reattached, log[-3000:]
        timeline.append({"run": run, "kill_to_restart_s": round(restarted["restarted_at"] - restarted["killed_at"], 1),
                         "kill_to_reattach_s": round(reattached[0] - restarted["killed_at"], 1),
                         "steps": steps, "steps_lost": EPOCHS * STEPS_PER_EPOCH - steps})
    print("worker/scheduler/triggerer restart timeline:", json.dumps(timeline))


def test_marking_a_deferred_task_failed_stops_its_job(stack, data, restarted):
    # long enough that the job is still training when it is told to stop, however fast the machine
    run = stack.trigger(DAG_ID, conf(data, epochs=200))
    wait_for(lambda: stack.task_states(DAG_ID, run).get("train") == "deferred" and
             status_times(folder(stack, run)), 600, "the training did not start while deferred",
             poll=0.5)
    pid = beat(stack, run)["pid"]
    stack.jobs.append(pid)
    stack.set_task_state(DAG_ID, run, "train", "failed")
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 180,
             "the job did not stop", poll=0.5)
    last = results.read_status(folder(stack, run))[-1]
    assert last["status"] == "FAILURE" and "the Airflow task was stopped by a user" in last["message"]
    assert (folder(stack, run) / "_FINISHED").is_file()  # what it had done is published
    assert stack.wait_run(DAG_ID, run, timeout=120) == "failed"
