"""End to end on a real Airflow (scheduler, dag-processor and API server processes; LocalExecutor;
PostgreSQL metadata on 127.0.0.1, a fresh database dropped afterwards, else SQLite: on two loaded cores
SQLite's one writer lock held the API server past its 60 s timeout while the scheduler stalled): DAGs triggered through the REST API with trigger params, datasets in a moto S3 server reached
through the ``aws_default`` connection, real engine jobs on a tiny model.

* the pipeline: every task's XCom, the published results folders, the metrics; the training process is
  killed after its first checkpoint and the retried task resumes from it; credentials appear nowhere;
* a misspelt override or a wrong type in the trigger params is refused when the run is triggered;
* AutoML: the pipeline's search fans its trials out over two mapped worker slots that the LocalExecutor
  runs at the same time on one Optuna study; every trial is recorded once and evaluate takes the best;
* a backfill of the retrain DAG over two logical dates trains each partition into its own folders,
  and the champion/challenger decision is returned with both numbers;
* the plugin's job page, reached from a task's extra link with a JWT.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml

from airflow_stack import AirflowStack, fresh_postgres_database
from operators.utils.jobs import job_id
from helpers import make_dataset, tiny_overrides, upload_tree
from s3_server import moto_endpoint, moto_server, new_bucket, s3_client  # noqa: F401 - pytest fixtures
from test_automl_pipeline import FIXED_SIZES, SMALL_SPACE  # the search space the tiny model can afford

pytestmark = pytest.mark.slow

SECRET = "m2f-e2e-secret-never-logged"
ACCESS_KEY = "AKIAM2FE2ETEST"
PIPELINE = "mask2former_pipeline"
RETRAIN = "mask2former_retrain"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e-data")
    make_dataset(root / "synthetic", images=4, val_images=2, size=64)
    retrain = root / "retrain"
    for day, seed in (("2024-01-01", 1), ("2024-01-08", 2)):
        make_dataset(root / f"part-{seed}", images=4, val_images=2, size=64, seed=seed)
        (retrain / day).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / f"part-{seed}" / "train", retrain / day)
    os.symlink(root / "synthetic" / "val", retrain / "eval")
    return root


@pytest.fixture(scope="module")
def metadata_database():
    with fresh_postgres_database("m2f_e2e") as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto_endpoint, data, metadata_database):
    home = tmp_path_factory.mktemp("airflow-e2e")
    connection = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET,
                  "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
    stack = AirflowStack(home, sql_alchemy_conn=metadata_database, extra_env={
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
        "MASK2FORMER_RESULTS_ROOT": str(home / "results"),
        "MASK2FORMER_WORK_DIR": str(home / "work"),
        "MASK2FORMER_CACHE_DIR": str(home / "cache"),
        "MASK2FORMER_DATA_ROOT": str(data / "retrain"),
        "MASK2FORMER_EVAL_DATASET": str(data / "retrain" / "eval"),
    })
    try:
        stack.start(timeout=240)
        stack.wait_dag(PIPELINE)
        stack.wait_dag(RETRAIN)
        stack.unpause(PIPELINE)
        yield stack
    finally:
        stack.stop()


#: The task that trains when the AutoML policy is off (the pipeline's training stage is operators/automl.py's
#: task group; its `train` task returns the chosen model's XCom).
TRAIN_TASK = "training.direct_train"
#: Epochs of the killed-and-resumed training: the kill lands after the first, so the retry trains the rest.
EPOCHS = 3


def pipeline_conf(train: str, val: str, **extra) -> dict:
    conf = {"train_datasets": train, "eval_dataset": val, "dataset_format": "coco_panoptic",
            "model.mode": "panoptic", "model.sem_seg_head.num_classes": 13, "train.num_epochs": 1,
            "train.optim.lr": 0.0002, "spec_overrides": tiny_overrides(), "automl_policy": "off"}
    conf.update(extra)
    return conf


def test_misspelt_override_or_wrong_type_is_refused_when_triggered(stack, data):
    """The REST API (and the form, which posts to it) checks the params against their JSON schemas, generated
    from the spec schemas: no run is created."""
    before = len(stack.runs(PIPELINE))
    base = pipeline_conf(str(data / "synthetic" / "train"), str(data / "synthetic" / "val"))
    for bad, named in (({"spec_overrides": {**tiny_overrides(), "model.mask_former.num_object_querys": 5}},
                        "model.mask_former.num_object_querys"),
                       ({"spec_overrides": {"train.num_epochs": "three"}}, "three"),
                       ({"train.num_epochs": 0}, "train.num_epochs")):
        reply = stack.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", json={"logical_date": None,
                                                                             "conf": {**base, **bad}})
        assert reply.status_code == 400 and named in reply.text, reply.text
    assert len(stack.runs(PIPELINE)) == before


@pytest.fixture(scope="module")
def pipeline_run(stack, moto_server, data):
    """The pipeline on S3 data with S3 results; its training process is killed after the first checkpoint."""
    client = s3_client(moto_server.endpoint_url)
    bucket = new_bucket(moto_server.endpoint_url)
    upload_tree(client, data / "synthetic", bucket, "data")
    conf = pipeline_conf(f"s3://{bucket}/data/train", f"s3://{bucket}/data/val",
                         **{"train.num_epochs": EPOCHS},
                         results_root=f"s3://{bucket}/results")
    run_id = stack.trigger(PIPELINE, conf)
    killed_pid = kill_training_after_first_checkpoint(stack.home / "work" / PIPELINE, TRAIN_TASK, timeout=300)
    state = stack.wait_run(PIPELINE, run_id, timeout=600)
    return {"run_id": run_id, "state": state, "bucket": bucket, "client": client, "killed_pid": killed_pid}


def kill_training_after_first_checkpoint(work: Path, task_id: str, timeout: float) -> int:
    """SIGKILL the engine's train process (found by its results folder) once epoch 1 is checkpointed.

    The process is found first and the checkpoint then polled every 20 ms: an epoch of the tiny model takes
    about a second, and a slower poll could kill the job after its last epoch instead of in the middle."""
    deadline = time.monotonic() + timeout
    pid = None
    while time.monotonic() < deadline:
        if pid is None:
            pid = _train_process(work.glob(f"*/{task_id}"))
        elif any(work.glob(f"*/{task_id}/model_epoch_001_step_*.pth")):
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.2 if pid is None else 0.02)
    raise TimeoutError(f"no train checkpoint under {work} after {timeout} s")


def _train_process(folders) -> int | None:
    folders = {str(folder) for folder in folders}
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "mask2former" in cmdline and "train" in cmdline and folders & set(cmdline):
            return process.info["pid"]
    return None


def test_pipeline_runs_every_stage_and_returns_small_xcoms(stack, pipeline_run):
    run_id, bucket = pipeline_run["run_id"], pipeline_run["bucket"]
    states = stack.task_states(PIPELINE, run_id)
    assert pipeline_run["state"] == "success", (states, stack.tail_logs())
    expected = {TRAIN_TASK: "success", "train": "success", "evaluate": "success", "export": "success",
                "gen_trt_engine": "skipped", "quantize": "success", "evaluate_quantized": "success"}
    assert {task: states[task] for task in expected} == expected
    prefix = f"s3://{bucket}/results/{PIPELINE}/"
    train = stack.xcom(PIPELINE, run_id, "train")
    assert train["action"] == "train" and train["status"] == "SUCCESS"
    assert train["results_dir"].startswith(prefix) and train["results_dir"].endswith(f"/{TRAIN_TASK}")
    assert train["artifacts"]["checkpoint"] == train["results_dir"] + "/model_latest.pth"
    assert train["artifacts"]["best_checkpoint"].startswith(train["results_dir"] + "/model_epoch_")
    assert train["metrics"]["epochs"] == EPOCHS
    evaluate = stack.xcom(PIPELINE, run_id, "evaluate")
    assert evaluate["status"] == "SUCCESS" and 0.0 <= evaluate["metrics"]["mIoU"] <= 100.0
    assert {"PQ", "AP"} <= set(evaluate["metrics"]) or any(k.endswith(".PQ") for k in evaluate["metrics"])
    export = stack.xcom(PIPELINE, run_id, "export")
    assert export["artifacts"]["onnx"] == export["results_dir"] + "/model.onnx"
    quantized = stack.xcom(PIPELINE, run_id, "quantize")["artifacts"]["quantized"]
    assert quantized.startswith(prefix) and "quantized_model_" in quantized
    assert stack.xcom(PIPELINE, run_id, "evaluate_quantized")["metrics"]
    for task in ("train", "evaluate", "export", "quantize", "evaluate_quantized"):
        xcom = stack.xcom(PIPELINE, run_id, task)
        assert len(json.dumps(xcom)) < 8000
        key = xcom["results_dir"][len(f"s3://{bucket}/"):]
        names = {o["Key"][len(key) + 1:] for o in pipeline_run["client"].list_objects_v2(
            Bucket=bucket, Prefix=key + "/")["Contents"]}
        assert {"_FINISHED", "status.json", "experiment.yaml", "spec.yaml"} <= names, (task, names)
    skip_log = stack.task_log(PIPELINE, run_id, "gen_trt_engine")
    assert "needs a CUDA GPU" in skip_log


def test_every_task_links_to_its_job_and_a_skipped_task_says_why(stack, pipeline_run):
    run_id = pipeline_run["run_id"]
    base = len(stack.base_url)
    result = stack.links(PIPELINE, run_id, "train")["Mask2Former job"]  # the training stage's result task
    assert f"/jobs/{job_id(PIPELINE, run_id, TRAIN_TASK)}?" in result
    page = stack.api("GET", result[base:])
    assert page.status_code == 200 and "Best mIoU" in page.text and "<svg" in page.text
    for task in ("evaluate", "export", "quantize", "evaluate_quantized"):
        url = stack.links(PIPELINE, run_id, task)["Mask2Former job"]
        assert stack.api("GET", url[base:]).status_code == 200, task
    skipped = stack.api("GET", stack.links(PIPELINE, run_id, "gen_trt_engine")["Mask2Former job"][base:])
    assert skipped.status_code == 200 and "SKIPPED" in skipped.text and "needs a CUDA GPU" in skipped.text


def model_events(stack, dag_id, run_id):
    reply = stack.api("GET", "/api/v2/assets/events", params={"source_dag_id": dag_id, "source_run_id": run_id})
    reply.raise_for_status()
    return [e for e in reply.json()["asset_events"] if e["name"] == "mask2former_model"]


def test_the_trained_model_is_an_asset_event_with_its_uri_metrics_and_run(stack, pipeline_run):
    run_id = pipeline_run["run_id"]
    (event,) = model_events(stack, PIPELINE, run_id)
    train = stack.xcom(PIPELINE, run_id, "train")
    extra = event["extra"]
    assert event["source_task_id"] == "train" and extra["run_id"] == run_id and extra["dag_id"] == PIPELINE
    assert extra["model_uri"] == train["artifacts"]["best_checkpoint"]
    assert extra["metrics"]["epochs"] == EPOCHS and extra["results_dir"] == train["results_dir"]


def test_task_log_shows_each_progress_line_once_and_one_line_per_validation(stack, pipeline_run):
    log = stack.task_log(PIPELINE, pipeline_run["run_id"], TRAIN_TASK, try_number=2)  # the resumed try
    for epoch in range(2, EPOCHS + 1):
        assert log.count(f"Validation after epoch {epoch}:") == 1, log[-3000:]
        assert log.count(f"Epoch {epoch}/{EPOCHS} done") == 1
    assert "Average Precision" not in log and "status.json: [RUNNING]" not in log


def test_killed_training_fails_its_try_and_the_retry_resumes(stack, pipeline_run):
    run_id = pipeline_run["run_id"]
    train = stack.task_instances(PIPELINE, run_id)[TRAIN_TASK]
    assert train["try_number"] == 2 and train["state"] == "success"
    first = stack.task_log(PIPELINE, run_id, TRAIN_TASK, 1)
    assert "the engine was killed by signal 9 (SIGKILL) before writing its final status" in first
    status = stack.home / "work" / job_id(PIPELINE, run_id, TRAIN_TASK) / "status.json"
    lines = [json.loads(line) for line in status.read_text().splitlines()]
    messages = [line.get("message", "") for line in lines]
    resuming = [m for m in messages if m.startswith("Resuming from model_epoch_")]
    assert len(resuming) == 1 and "step 0" not in resuming[0], messages
    assert any(m.startswith("Training resumed at epoch ") for m in messages), messages
    assert f"Epoch {EPOCHS}/{EPOCHS} done" in " ".join(messages) and lines[-1]["status"] == "SUCCESS"


def test_credentials_appear_in_no_log_xcom_or_spec(stack, pipeline_run):
    run_id, bucket, client = pipeline_run["run_id"], pipeline_run["bucket"], pipeline_run["client"]
    for path in list((stack.home / "logs").rglob("*")) + list((stack.home / "work").rglob("*")):
        if path.is_file() and path.suffix in (".log", ".json", ".yaml", ".txt", ".csv", ""):
            text = path.read_text(errors="replace")
            assert SECRET not in text and ACCESS_KEY not in text, path
    for task in ("train", "evaluate", "export", "quantize"):
        assert SECRET not in json.dumps(stack.xcom(PIPELINE, run_id, task))
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="results/")["Contents"]:
        if obj["Key"].endswith((".yaml", ".json")):
            assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()


#: The AutoML stage's tasks (operators/automl.py; the DAG maps the trials over 2 worker slots).
TRIALS_TASK = "training.automl_trials"
AUTOML_SLOTS = 2
#: Trials of the search: two per slot, so that each slot runs more than one on the shared study.
AUTOML_TRIALS = 4
#: Tasks after training that are not about it; marked skipped through the REST API when the run is created.
NOT_ABOUT_TRAINING = ("export", "quantize")  # with their downstream gen_trt_engine and evaluate_quantized


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _overlap(first: tuple, second: tuple) -> bool:
    """Two (start, end) intervals share some time."""
    return first[0] < second[1] and second[0] < first[1]


@pytest.fixture(scope="module")
def automl_run(stack, data):
    """The pipeline with AutoML on: a random search of 1-epoch trials on local data over both worker slots."""
    conf = pipeline_conf(str(data / "synthetic" / "train"), str(data / "synthetic" / "val"), automl_policy="auto",
                         automl_algorithm="random", automl_max_recommendations=AUTOML_TRIALS, automl_max_epochs=1,
                         automl_remove_parameters=FIXED_SIZES, automl_custom_ranges=SMALL_SPACE)
    run_id = stack.trigger(PIPELINE, conf)
    for task in NOT_ABOUT_TRAINING:  # their task instances exist from the run's creation; training takes minutes
        stack.set_task_state(PIPELINE, run_id, task, "skipped", downstream=True)
    state = stack.wait_run(PIPELINE, run_id, timeout=400)
    return {"run_id": run_id, "state": state}


def test_automl_trial_slots_run_at_the_same_time_under_the_local_executor(stack, automl_run):
    run_id = automl_run["run_id"]
    states = stack.task_states(PIPELINE, run_id)
    assert automl_run["state"] == "success", (states, stack.tail_logs())
    expected = {"training.policy": "success", "training.automl_plan": "success", "training.direct_train": "skipped",
                "training.automl_select": "success", "train": "success", "evaluate": "success",
                "export": "skipped", "gen_trt_engine": "skipped", "quantize": "skipped",
                "evaluate_quantized": "skipped"}
    assert {task: states[task] for task in expected} == expected
    slots = stack.mapped_task_instances(PIPELINE, run_id, TRIALS_TASK)
    assert [(ti["map_index"], ti["state"]) for ti in slots] == [(i, "success") for i in range(AUTOML_SLOTS)]
    assert all(ti["try_number"] == 1 and ti["pool"] == "mask2former_gpu" for ti in slots), slots
    first, second = ((_time(ti["start_date"]), _time(ti["end_date"])) for ti in slots)
    assert _overlap(first, second), slots  # each slot started before the other one ended
    # ...and not only the tasks: the trials of the two slots trained at the same time on the shared study.
    import optuna

    plan = stack.xcom(PIPELINE, run_id, "training.automl_plan")
    study = optuna.load_study(study_name=plan["plan"]["study_name"],
                              storage=f"sqlite:///{Path(plan['publish_uri']) / 'study.db'}")
    spans = {slot: [(t.datetime_start, t.datetime_complete) for t in study.trials if t.user_attrs["slot"] == slot]
             for slot in range(AUTOML_SLOTS)}
    assert any(_overlap(a, b) for a in spans[0] for b in spans[1]), spans


def test_automl_records_every_trial_once_and_evaluate_takes_the_best(stack, automl_run):
    run_id = automl_run["run_id"]
    assert automl_run["state"] == "success", stack.task_states(PIPELINE, run_id)
    select = stack.xcom(PIPELINE, run_id, "training.automl_select")
    table = json.loads(Path(select["automl"]["summary"]["trials_json"]).read_text())
    numbers = [row["number"] for row in table]
    assert sorted(numbers) == list(range(AUTOML_TRIALS)), table  # every trial asked for, each recorded once
    per_slot = AUTOML_TRIALS // AUTOML_SLOTS  # the budget split evenly over the slots
    assert sorted(row["slot"] for row in table) == sorted(list(range(AUTOML_SLOTS)) * per_slot)
    assert all(row["state"] == "COMPLETE" for row in table), table
    assert len({row["results_dir"] for row in table}) == AUTOML_TRIALS
    by_slot = {}
    for slot in range(AUTOML_SLOTS):  # each slot's XCom lists exactly the trials the study recorded for it
        reported = stack.xcom(PIPELINE, run_id, TRIALS_TASK, map_index=slot)
        assert reported["slot"] == slot
        by_slot[slot] = sorted(t["number"] for t in reported["trials"])
        assert by_slot[slot] == sorted(row["number"] for row in table if row["slot"] == slot)
    assert sorted(sum(by_slot.values(), [])) == list(range(AUTOML_TRIALS))
    # every trial's own train folder: a finished job whose best validation mIoU is the value the study holds
    trained = {}
    for row in table:
        folder = Path(row["results_dir"])
        assert json.loads((folder / "status.json").read_text().splitlines()[-1])["status"] == "SUCCESS", folder
        trained[row["number"]] = json.loads((folder / "metrics.json").read_text())["best"]["mIoU"]
        assert row["value"] == pytest.approx(trained[row["number"]])
    best_value = max(trained.values())
    best = min(number for number, value in trained.items() if value == best_value)

    train = stack.xcom(PIPELINE, run_id, "train")
    assert train["action"] == "train" and train["status"] == "SUCCESS"
    assert train["results_dir"] == table[numbers.index(best)]["results_dir"]
    assert train["job_id"] == f"{job_id(PIPELINE, run_id, 'training.automl_plan')}/trials/trial_{best:03d}"
    assert train["metrics"]["best.mIoU"] == pytest.approx(best_value)
    automl = train["automl"]
    assert automl["used"] is True and automl["policy"] == "auto" and automl["best_trial"] == best
    assert automl["best_value"] == pytest.approx(best_value)
    assert automl["trials"] == AUTOML_TRIALS and automl["counts"]["COMPLETE"] == AUTOML_TRIALS

    evaluate = stack.xcom(PIPELINE, run_id, "evaluate")
    assert evaluate["status"] == "SUCCESS" and 0.0 <= evaluate["metrics"]["mIoU"] <= 100.0
    spec = yaml.safe_load((Path(evaluate["results_dir"]) / "experiment.yaml").read_text())
    checkpoint = Path(spec["evaluate"]["checkpoint"])
    assert checkpoint.parent == Path(train["results_dir"]) and checkpoint.is_file()
    assert checkpoint in {Path(train["artifacts"][kind]) for kind in ("best_checkpoint", "checkpoint")
                          if kind in train["artifacts"]}


def test_backfill_retrains_each_partition_into_its_own_folder(stack):
    stack.unpause(RETRAIN)
    conf = {"spec_overrides": tiny_overrides(), "model.sem_seg_head.num_classes": 13, "train.num_epochs": 1}
    stack.backfill(RETRAIN, "2024-01-01", "2024-01-09", conf)
    deadline = time.monotonic() + 600
    runs = []
    while time.monotonic() < deadline:
        runs = [r for r in stack.runs(RETRAIN) if r["run_type"] == "backfill"]
        if len(runs) == 2 and all(r["state"] in ("success", "failed") for r in runs):
            break
        time.sleep(3)
    assert sorted(r["state"] for r in runs) == ["success", "success"], \
        ({r["dag_run_id"]: stack.task_states(RETRAIN, r["dag_run_id"]) for r in runs}, stack.tail_logs())
    runs.sort(key=lambda r: r["logical_date"])
    folders = []
    decisions = []
    for run, day in zip(runs, ("2024-01-01", "2024-01-08")):
        train = stack.xcom(RETRAIN, run["dag_run_id"], "train")
        assert stack.xcom(RETRAIN, run["dag_run_id"], "select_partition").endswith(f"/retrain/{day}")
        folders.append(train["results_dir"])
        decisions.append(stack.xcom(RETRAIN, run["dag_run_id"], "decide"))
    assert folders[0] != folders[1] and all(Path(f, "_FINISHED").is_file() for f in folders)
    assert decisions[0]["decision"] == "promote" and decisions[0]["champion"] is None
    assert decisions[1]["champion"] == decisions[0]["challenger"]
    assert decisions[1]["decision"] == ("promote" if decisions[1]["challenger"] > decisions[1]["champion"] else "keep")
    champion = json.loads((stack.home / "results" / "champion.json").read_text())
    winner = runs[1] if decisions[1]["decision"] == "promote" else runs[0]
    assert champion["run_id"] == winner["dag_run_id"] and champion["metric"] == "mIoU"
    (promoted,) = model_events(stack, RETRAIN, winner["dag_run_id"])  # the promotion is an Asset event
    assert promoted["extra"]["champion"].endswith("champion.json") and promoted["extra"]["model_uri"]
    assert promoted["extra"]["data_partition"].endswith("/retrain/" + winner["logical_date"][:10])
    second_states = stack.task_states(RETRAIN, runs[1]["dag_run_id"])
    assert second_states["evaluate_champion"] == "skipped"  # same evaluation set: the recorded mIoU is used
    if decisions[1]["decision"] == "keep":
        assert second_states["export"] == "skipped" and second_states["write_champion"] == "skipped"


def wait_runs(stack, dag_id, pick, count, timeout=300):
    deadline = time.monotonic() + timeout
    runs = []
    while time.monotonic() < deadline:
        runs = [r for r in stack.runs(dag_id) if pick(r)]
        if len(runs) >= count and all(r["state"] in ("success", "failed") for r in runs):
            return runs
        time.sleep(2)
    raise TimeoutError(f"{dag_id}: {runs}\n{stack.tail_logs()}")


def test_scheduled_retrain_without_new_data_is_skipped_with_its_reason(stack):
    """Unpausing makes the scheduler create the last Monday's run at once; no partition of that date exists."""
    stack.unpause(RETRAIN)
    run = wait_runs(stack, RETRAIN, lambda r: r["run_type"] == "scheduled", 1)[0]
    day = run["logical_date"][:10]
    assert run["state"] == "success", stack.task_states(RETRAIN, run["dag_run_id"])
    states = stack.task_states(RETRAIN, run["dag_run_id"])
    assert states["select_partition"] == "skipped" and states["train"] == "skipped"
    assert states["decide"] == "skipped" and states["write_champion"] == "skipped"
    assert f"no new data for {day}" in stack.task_log(RETRAIN, run["dag_run_id"], "select_partition")


def test_partition_choice_follows_how_the_run_was_triggered(stack):
    """The trigger form's payload (logical date = now), the REST API with a partition param and without a
    logical date, and an asset event naming a partition; the training itself is marked skipped at creation."""
    stack.unpause(RETRAIN)
    now = datetime.now().astimezone().isoformat()
    made = {}
    for name, body in (("form", {"logical_date": now, "conf": {}}),
                       ("api_param", {"logical_date": None, "conf": {"partition": "2024-01-01"}})):
        reply = stack.api("POST", f"/api/v2/dags/{RETRAIN}/dagRuns", json=body)
        assert reply.status_code == 200, reply.text
        made[name] = reply.json()["dag_run_id"]
        stack.set_task_state(RETRAIN, made[name], "train", "skipped", downstream=True)
    refused = stack.api("POST", f"/api/v2/dags/{RETRAIN}/dagRuns",
                        json={"logical_date": None, "conf": {"partition": "last monday"}})
    assert refused.status_code == 400 and "partition" in refused.text  # the form's pattern, at trigger time
    assets = stack.api("GET", "/api/v2/assets", params={"name_pattern": "mask2former_training_data"}).json()["assets"]
    event = stack.api("POST", "/api/v2/assets/events",
                      json={"asset_id": assets[0]["id"], "extra": {"partition": "2024-01-01"}})
    assert event.status_code == 200, event.text
    deadline = time.monotonic() + 120
    while "asset" not in made and time.monotonic() < deadline:
        made.update(("asset", r["dag_run_id"]) for r in stack.runs(RETRAIN) if r["run_type"] == "asset_triggered")
        time.sleep(0.5)
    stack.set_task_state(RETRAIN, made["asset"], "train", "skipped", downstream=True)
    for run_id in made.values():
        assert stack.wait_run(RETRAIN, run_id, timeout=300) == "success"
    choices = {name: stack.xcom(RETRAIN, run_id, "select_partition", key="partition_choice")
               for name, run_id in made.items()}
    assert choices["form"]["partition"] == "2024-01-08" and "newest" in choices["form"]["reason"]
    assert choices["form"]["run_type"] == "manual"
    assert choices["api_param"]["partition"] == "2024-01-01" and "param" in choices["api_param"]["reason"]
    assert choices["asset"]["partition"] == "2024-01-01" and "asset" in choices["asset"]["reason"]
    assert choices["asset"]["run_type"] == "asset_triggered"
    log = stack.task_log(RETRAIN, made["form"], "select_partition")
    assert "training on" in log and "the newest partition" in log


def test_extra_link_opens_the_plugin_job_page(stack):
    run = next(r for r in stack.runs(RETRAIN) if r["run_type"] == "backfill")
    links = stack.links(RETRAIN, run["dag_run_id"], "train")
    url = links["Mask2Former job"]
    assert url.startswith(f"{stack.base_url}/mask2former/jobs/{RETRAIN}/")
    page = stack.api("GET", url[len(stack.base_url):])
    assert page.status_code == 200 and "Best mIoU" in page.text  # one epoch: a value, not a chart
    listing = stack.api("GET", "/mask2former/api/jobs").json()
    assert any(job["job_id"].endswith("/train") and job["status"] == "SUCCESS" for job in listing["jobs"])
    import requests

    assert requests.get(f"{stack.base_url}/mask2former/api/jobs", timeout=30).status_code == 401
    plugins = {p["name"]: p for p in stack.api("GET", "/api/v2/plugins").json()["plugins"]}
    assert plugins["mask2former"]["fastapi_apps"][0]["url_prefix"] == "/mask2former"
    assert plugins["mask2former"]["external_views"][0]["href"] == "/mask2former/"


def test_the_users_journey_in_a_real_browser(stack, pipeline_run, data, tmp_path_factory):
    """Log in; trigger mask2former_pipeline from its form and see a misspelt override refused there; trigger it
    and follow the run; open a task's extra link to its job page (metrics, plots, images); trigger
    mask2former_retrain from its form. Screenshots: the test's output folder (printed)."""
    from browser_journey import Journey, chromium_path
    from airflow_stack import ADMIN_PASSWORD

    if not chromium_path():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.mktemp("browser-journey")
    print(f"screenshots: {shots}")
    before = {r["dag_run_id"] for r in stack.runs(PIPELINE)}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        try:
            journey = Journey(browser.new_page(viewport={"width": 1400, "height": 1000}), stack.base_url, shots)
            journey.log_in("admin", ADMIN_PASSWORD)
            journey.shot("home")

            dialog = journey.open_trigger_form(PIPELINE)
            fields = {"train_datasets": str(data / "synthetic" / "train"),
                      "eval_dataset": str(data / "synthetic" / "val")}
            typo = json.dumps({**tiny_overrides(), "model.mask_former.num_object_querys": 5})
            journey.fill_form(dialog, fields, typo)
            journey.shot("pipeline_form_typo")
            journey.submit(dialog)
            journey.wait_text(r"model\.mask_former\.num_object_querys' was unexpected")
            journey.shot("pipeline_form_refused")
            assert {r["dag_run_id"] for r in stack.runs(PIPELINE)} == before  # refused: no run

            journey.page.keyboard.press("Escape")
            dialog = journey.open_trigger_form(PIPELINE)
            journey.fill_form(dialog, fields, json.dumps(tiny_overrides(**{"model.sem_seg_head.num_classes": 13,
                                                                            "train.num_epochs": 1})))
            journey.submit(dialog)
            journey.until(lambda: {r["dag_run_id"] for r in stack.runs(PIPELINE)} - before, timeout=60)
            (run_id,) = {r["dag_run_id"] for r in stack.runs(PIPELINE)} - before
            for task in ("training.policy",):  # the journey follows the run, not a second training
                stack.set_task_state(PIPELINE, run_id, task, "skipped", downstream=True)
            assert stack.wait_run(PIPELINE, run_id, timeout=300) == "success"
            journey.page.goto(f"{stack.base_url}/dags/{PIPELINE}/runs/{run_id}", wait_until="networkidle")
            journey.wait_text("success|Success")
            journey.shot("pipeline_run_followed")

            done = pipeline_run["run_id"]
            expected = stack.links(PIPELINE, done, "evaluate")["Mask2Former job"]  # what the extra link opens
            assert journey.open_extra_link(PIPELINE, done, "evaluate", "Mask2Former job") == expected
            text = journey.wait_text("Metrics")
            assert "mIoU" in text and "All jobs" in text
            assert journey.page.locator("img.result").count() >= 1  # the evaluation's charts and images
            journey.shot("job_page")
            train = stack.links(PIPELINE, done, "train")["Mask2Former job"]
            journey.page.goto(train, wait_until="networkidle")
            assert journey.page.locator("svg.chart").count() >= 1 and "Best mIoU" in journey.wait_text("Plots")
            journey.shot("train_job_page_plots")

            stack.unpause(RETRAIN)
            retrains = {r["dag_run_id"] for r in stack.runs(RETRAIN)}
            dialog = journey.open_trigger_form(RETRAIN)
            journey.shot("retrain_form")
            dialog.get_by_role("button", name="Trigger", exact=True).last.click()
            def form_runs():  # unpausing also lets the scheduler create the last Monday's run
                return [r["dag_run_id"] for r in stack.runs(RETRAIN)
                        if r["dag_run_id"] not in retrains and r["run_type"] == "manual"]

            journey.until(form_runs, timeout=60)
            (retrain_id,) = form_runs()
            stack.set_task_state(RETRAIN, retrain_id, "train", "skipped", downstream=True)
            assert stack.wait_run(RETRAIN, retrain_id, timeout=300) == "success"
            choice = stack.xcom(RETRAIN, retrain_id, "select_partition", key="partition_choice")
            assert choice["run_type"] == "manual" and "newest" in choice["reason"]  # the form's "now" is no partition
            journey.page.goto(f"{stack.base_url}/dags/{RETRAIN}/runs/{retrain_id}", wait_until="networkidle")
            journey.shot("retrain_run")
        finally:
            browser.close()
