"""The operators' building blocks: job folders, the one check of a job's spec, parent models, outcomes, the job
entry point (a real engine job, and a stand-in interpreter), the trigger that follows a detached job, GPU
detection, partitions and the champion record. S3 is moto's server on 127.0.0.1, reached through the Airflow
connection ``aws_default`` as in production. (Pods: tests/airflow/test_kubernetes.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from helpers import fake_context, make_dataset, tiny_overrides, upload_tree
from mask2former import results
from mask2former.config import SpecError
from operators import KubernetesPodLauncher, LocalProcessLauncher, Mask2FormerStorageHook
from operators.operators.actions import (Mask2FormerEvaluateOperator, Mask2FormerGenTrtEngineOperator,
                                         Mask2FormerTrainOperator)
from operators.pod_job import JobProcess, engine_env
from operators.triggers.job import Mask2FormerJobTrigger
from operators.utils import jobs, outcome, overrides, parents
from s3_server import moto_endpoint, moto_server, new_bucket, s3_client  # noqa: F401 - pytest fixtures

SECRET = "m2f-test-secret-never-logged"
LOCAL = Mask2FormerStorageHook(aws_conn_id=None)


@pytest.fixture
def aws_conn(moto_endpoint, monkeypatch):  # noqa: F811
    """The Airflow connection aws_default pointing at the moto server (distinctive fake credentials)."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIAM2FTEST", "password": SECRET,
        "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}))
    return moto_endpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def fake_train_folder(folder: Path, *, best_epoch: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, step in ((1, 2), (2, 4)):
        (folder / f"model_epoch_{epoch:03d}_step_{step:06d}.pth").write_bytes(b"ckpt")
    (folder / "model_latest.pth").write_bytes(b"ckpt")
    best = f"model_epoch_{best_epoch:03d}_step_{best_epoch * 2:06d}.pth"
    (folder / "best_model.json").write_text(json.dumps({"epoch": best_epoch, "step": 2, "metric": "mIoU",
                                                        "value": 3.5, "checkpoint": best}))
    (folder / "status.json").write_text(json.dumps({"status": "STARTED", "message": "train started"}) + "\n"
                                        + json.dumps({"status": "SUCCESS", "message": "done"}) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"mIoU": 3.5, "PQ": 1.0, "per_class": {"sky": [1, 2]},
                                                     "best": {"epoch": 1, "mIoU": 3.5}, "bad": float("nan")}))
    return folder


# ------------------------------------------------------------------------------------ job folders


def test_job_id_is_sanitised_and_keyed_without_try_number():
    assert jobs.job_id("mask2former_pipeline", "manual__2024-01-01T00:00:00+00:00", "train") == \
        "mask2former_pipeline/manual__2024-01-01T00_00_00_00_00/train"
    assert jobs.job_id("d", "r", "t", map_index=3) == "d/r/t.map3"
    assert jobs.sanitize("..") == "_" and jobs.sanitize("a/../b") == "a_.._b"


def test_job_paths_run_in_place_locally_and_under_the_work_root_for_s3(tmp_path):
    local = jobs.JobPaths.resolve(job="d/r/t", results_root=str(tmp_path / "results"))
    assert local.local_dir == tmp_path / "results" / "d/r/t" and local.publish_uri == str(local.local_dir)
    remote_paths = jobs.JobPaths.resolve(job="d/r/t", results_root="s3://bucket/results/", work_dir=tmp_path / "w")
    assert remote_paths.publish_uri == "s3://bucket/results/d/r/t" and remote_paths.publishes_to_s3
    assert remote_paths.local_dir == tmp_path / "w" / "d/r/t"


# -------------------------------------------------------------------------------------- overrides


def test_overrides_are_coerced_from_mappings_json_yaml_and_words():
    assert overrides.coerce_overrides('{"train.num_epochs": 3}') == {"train.num_epochs": 3}
    assert overrides.coerce_overrides("train.num_epochs: 3") == {"train.num_epochs": 3}
    assert overrides.coerce_overrides(["train.num_epochs=3", "model.mode=semantic"]) == \
        {"train.num_epochs": 3, "model.mode": "semantic"}
    assert overrides.coerce_overrides(None) == {}
    with pytest.raises(SpecError, match="mapping"):
        overrides.coerce_overrides(42)


def test_a_jobs_spec_is_checked_once_each_key_by_the_action_reading_its_section():
    shared = {"export.opset_version": 17, "evaluate.batch_size": 2, "model.mode": "semantic", "train.num_epochs": 2}
    # every key goes to the job, whose engine reports evaluate.* and train.* as not used by export
    assert overrides.job_overrides("export", shared, {"export.checkpoint": "/m.pth"}) == \
        {"export.checkpoint": "/m.pth", **shared}
    with pytest.raises(SpecError, match="export.checkpoint is not set"):  # cross-key rules: the whole spec, once
        overrides.job_overrides("export", shared, {})
    with pytest.raises(SpecError, match="export.opset_version.*99"):
        overrides.job_overrides("train", {"export.opset_version": 99}, {})
    with pytest.raises(SpecError, match="model.mask_former.hidden_dm.*hidden_dim"):
        overrides.job_overrides("export", {"model.mask_former.hidden_dm": 32}, {"export.checkpoint": "/m.pth"})
    with pytest.raises(SpecError, match="results_dir"):
        overrides.job_overrides("train", {"results_dir": "/tmp/x"}, {})
    with pytest.raises(SpecError, match="encryption_key.*secret"):
        overrides.job_overrides("train", {"encryption_key": "k"}, {})


def test_literal_overrides_are_checked_at_construction_templated_ones_at_execute():
    with pytest.raises(SpecError, match="train.num_epochs.*0"):
        Mask2FormerTrainOperator(task_id="t", spec_overrides={"train.num_epochs": 0})
    with pytest.raises(SpecError, match="dataset_format 'cocoo'"):
        Mask2FormerTrainOperator(task_id="t", dataset_format="cocoo")
    op = Mask2FormerTrainOperator(task_id="t", spec_overrides={"train.num_epochs": "{{ params.epochs }}"},
                                  dataset_format="{{ params.fmt }}")
    assert op.spec_overrides == {"train.num_epochs": "{{ params.epochs }}"}
    Mask2FormerTrainOperator(task_id="t2", spec_overrides="{{ mask2former_overrides(params) }}")


@pytest.mark.parametrize("kwargs,message", [
    ({"launcher": "kubernetes"}, "launcher='kubernetes' is not a launcher: give LocalProcessLauncher()"),
    ({"check_interval": 0}, "check_interval must be a positive number"),
    ({"job_timeout": "soon"}, "job_timeout must be a positive number of seconds or a timedelta")])
def test_bad_job_arguments_are_refused_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Mask2FormerTrainOperator(task_id="t", **kwargs)


# -------------------------------------------------------------------------------- spec building


def test_train_spec_takes_planned_sources_then_user_keys(dataset):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"),
                                  eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                  spec_overrides=tiny_overrides(**{"dataset.val.img_dir": "/elsewhere/images"}))
    built = op.job_spec()
    assert built["dataset.train.panoptic_json"] == str(dataset / "train" / "annotations_panoptic.json")
    assert built["dataset.label_map"] == str(dataset / "train" / "label_map_panoptic.json")
    assert built["dataset.val.img_dir"] == "/elsewhere/images"  # the user's key wins
    assert built["model.mask_former.hidden_dim"] == 32


def test_evaluate_spec_leaves_out_the_training_split_and_takes_the_parent_checkpoint(dataset, tmp_path):
    parent_dir = fake_train_folder(tmp_path / "train")
    op = Mask2FormerEvaluateOperator(task_id="evaluate", train_datasets=str(dataset / "train"),
                                     eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                     parent={"action": "train", "results_dir": str(parent_dir)},
                                     spec_overrides=tiny_overrides())
    built = op.job_spec()
    assert not any(k.startswith(("dataset.train.img_dir", "dataset.train.panoptic")) for k in built)
    assert built["dataset.val.panoptic_dir"] == str(dataset / "val" / "images_panoptic.tar.gz")
    assert built["evaluate.checkpoint"] == str(parent_dir / "model_epoch_001_step_000002.pth")
    assert "train.num_epochs" not in built


def test_spec_rule_errors_fail_the_task_without_retry(dataset):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"), dataset_format="coco",
                                  spec_overrides=tiny_overrides())
    with pytest.raises(AirflowFailException, match="dataset.label_map is not set"):  # no label_map.json there
        op.job_spec()
    no_format = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"))
    with pytest.raises(AirflowFailException, match="dataset_format is needed"):
        no_format.job_spec()


# -------------------------------------------------------------------------------- parent models


@pytest.mark.parametrize("choose,epoch,expected", [("best_model", None, "model_epoch_001_step_000002.pth"),
                                                   ("latest_model", None, "model_latest.pth"),
                                                   ("from_epoch_number", 2, "model_epoch_002_step_000004.pth")])
def test_parent_checkpoint_follows_the_choose_method(tmp_path, choose, epoch, expected):
    folder = fake_train_folder(tmp_path / "train")
    parent = {"action": "train", "results_dir": str(folder)}
    assert parents.resolve_parent("export", parent, choose=choose, epoch=epoch, hook=LOCAL) == \
        {"export.checkpoint": str(folder / expected)}
    assert parents.resolve_parent("quantize", parent, choose=choose, epoch=epoch, hook=LOCAL) == \
        {"quantize.model_path": str(folder / expected)}


def test_parent_kinds_map_to_the_downstream_keys(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model.onnx").write_bytes(b"onnx")
    quant_dir = tmp_path / "quantize"
    quant_dir.mkdir()
    (quant_dir / "quantized_model_modelopt_onnx.onnx").write_bytes(b"q")
    onnx_parent = {"action": "export", "results_dir": str(export_dir)}
    kwargs = {"choose": "best_model", "epoch": None, "hook": LOCAL}
    assert parents.resolve_parent("gen_trt_engine", onnx_parent, **kwargs) == \
        {"gen_trt_engine.onnx_file": str(export_dir / "model.onnx")}
    assert parents.resolve_parent("evaluate", onnx_parent, **kwargs) == \
        {"evaluate.onnx_file": str(export_dir / "model.onnx")}
    assert parents.resolve_parent("evaluate", {"action": "quantize", "results_dir": str(quant_dir)}, **kwargs) == \
        {"evaluate.onnx_file": str(quant_dir / "quantized_model_modelopt_onnx.onnx")}
    with pytest.raises(parents.ParentError, match="evaluate, which produces no model"):
        parents.resolve_parent("export", {"action": "evaluate", "results_dir": str(export_dir)}, **kwargs)
    with pytest.raises(parents.ParentError, match="cannot take a onnx model"):
        parents.resolve_parent("export", onnx_parent, **kwargs)
    with pytest.raises(parents.ParentError, match="No checkpoint"):
        parents.resolve_parent("export", {"action": "train", "results_dir": str(export_dir)}, **kwargs)


def test_parent_on_s3_resolves_through_an_index_of_the_published_folder(tmp_path, aws_conn):
    bucket = new_bucket(aws_conn)
    upload_tree(s3_client(aws_conn), fake_train_folder(tmp_path / "train", best_epoch=2), bucket, "results/d/r/train")
    parent = {"action": "train", "results_dir": f"s3://{bucket}/results/d/r/train"}
    found = parents.resolve_parent("evaluate", parent, choose="best_model", epoch=None,
                                   hook=Mask2FormerStorageHook())
    assert found == {"evaluate.checkpoint": f"s3://{bucket}/results/d/r/train/model_epoch_002_step_000004.pth"}


@pytest.mark.parametrize("bad,key", [({"train.optim.lrr": 0.001}, "train.optim.lrr"),
                                     ({"train.num_epochs": 0}, "train.num_epochs"),
                                     ({"model.mode": "panoptik"}, "model.mode")])
def test_bad_rendered_override_fails_before_anything_is_staged(tmp_path, dataset, aws_conn, moto_server,  # noqa: F811
                                                               monkeypatch, bad, key):
    bucket = new_bucket(aws_conn)
    upload_tree(s3_client(aws_conn), dataset / "train", bucket, "train")
    monkeypatch.setenv("MASK2FORMER_CACHE_DIR", str(tmp_path / "cache"))
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=f"s3://{bucket}/train",
                                  dataset_format="coco_panoptic", results_root=str(tmp_path / "results"),
                                  spec_overrides="{{ mask2former_overrides(params) }}")
    op.spec_overrides = {**tiny_overrides(), **bad}  # as rendered from the trigger params
    with pytest.raises(AirflowFailException, match=key.replace(".", r"\.")) as failure:
        op.execute(fake_context(task_id="train"))
    assert "Nothing was staged or run" in str(failure.value)
    assert moto_server.object_gets(bucket) == []
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------- job outcome


def test_outcome_is_small_json_safe_and_names_uris(tmp_path):
    folder = fake_train_folder(tmp_path / "train")
    result = outcome.job_outcome(action="train", job_id="d/r/train", folder=folder, publish_uri="s3://b/res/d/r/train")
    assert result["status"] == "SUCCESS" and result["results_dir"] == "s3://b/res/d/r/train"
    assert result["artifacts"] == {"checkpoint": "s3://b/res/d/r/train/model_latest.pth",
                                   "best_checkpoint": "s3://b/res/d/r/train/model_epoch_001_step_000002.pth",
                                   "metrics": "s3://b/res/d/r/train/metrics.json"}
    assert result["metrics"] == {"mIoU": 3.5, "PQ": 1.0, "best.epoch": 1, "best.mIoU": 3.5, "bad": None}
    json.dumps(result, allow_nan=False)
    assert outcome.find_metric({"panoptic.PQ": 2.0, "mIoU": 1.0}, "PQ") == 2.0
    assert outcome.find_metric({"a.mIoU": 1.0, "b.mIoU": 2.0}, "mIoU") is None


def test_extra_link_points_at_the_plugin_job_page():
    from operators import Mask2FormerJobLink

    key = fake_context(dag_id="mask2former_pipeline", task_id="train")["ti"]
    url = Mask2FormerJobLink().get_link(None, ti_key=key)
    assert url == "http://localhost:8080/mask2former/jobs/mask2former_pipeline/manual__2024-01-01T00_00_00_00_00/train"


# ----------------------------------------------------------------------------------- job processes


def test_the_engine_gets_no_credentials(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:secret@h/db")
    env = engine_env()
    assert "secret" not in json.dumps(env)
    assert str(Path(__file__).resolve().parents[2]) == env["PYTHONPATH"].split(":")[0]


STAND_IN_ENGINE = """#!/bin/sh
# A stand-in interpreter (a shell script, not Python or the engine): records the command and the spec it gets,
# writes the status lines the engine would, then exits with $STAND_IN_EXIT.
folder="$7"
echo "$@" > "$folder/command.txt"
cp "$5" "$folder/spec_seen.yaml"
echo '{"status": "STARTED", "message": "train started"}' >> "$folder/status.json"
echo '{"status": "RUNNING", "message": "epoch 1 done", "epoch": 1, "max_epoch": 1, "kpi": {"mIoU": 2.5}}' >> "$folder/status.json"
[ "${STAND_IN_EXIT:-0}" = 0 ] && echo '{"status": "SUCCESS", "message": "train finished"}' >> "$folder/status.json"
exit "${STAND_IN_EXIT:-0}"
"""


def stand_in_engine(tmp_path: Path) -> Path:
    path = tmp_path / "stand-in-python"
    path.write_text(STAND_IN_ENGINE)
    path.chmod(0o755)
    return path


def test_the_job_process_stages_writes_the_spec_runs_and_publishes(tmp_path, dataset, monkeypatch):
    url = "https://example.invalid/swin_tiny_patch4_window7_224.pth"
    job = jobs.JobDescription(action="train", job_id="d/r/train", publish_uri=str(tmp_path / "results" / "job"),
                              local_dir=str(tmp_path / "results" / "job"), cache_dir=str(tmp_path / "cache"),
                              overrides={"dataset.train.img_dir": f"file://{dataset / 'train' / 'images.tar.gz'}",
                                         "dataset.label_map": str(dataset / "train" / "label_map_panoptic.json"),
                                         "model.backbone.pretrained_weights": url, "train.num_epochs": 1})
    logged = []
    code = JobProcess(job, LOCAL, logged.append, python=str(stand_in_engine(tmp_path))).run()
    folder = Path(job.local_dir)
    assert code == 0 and (folder / "_FINISHED").is_file()
    spec = yaml.safe_load((folder / "spec_seen.yaml").read_text())
    assert spec["model"]["backbone"]["pretrained_weights"] == url  # fetched by the engine itself
    assert Path(spec["dataset"]["train"]["img_dir"]).is_dir()  # file:// images.tar.gz extracted into the cache
    assert spec["dataset"]["train"]["img_dir"].startswith(str(tmp_path / "cache"))
    assert spec["dataset"]["label_map"] == str(dataset / "train" / "label_map_panoptic.json")  # used in place
    assert (folder / "command.txt").read_text().split()[:3] == ["-m", "mask2former", "train"]
    assert not [line for line in logged if line.startswith("status.json:")]  # the engine prints its own progress
    assert LOCAL.last_beat(job.publish_uri)["exit_code"] == 0

    monkeypatch.setenv("STAND_IN_EXIT", "9")  # an engine that dies without its final status line
    assert JobProcess(job, LOCAL, logged.append, python=str(stand_in_engine(tmp_path))).run() == 9
    last = results.read_status(folder)[-1]
    assert last["status"] == "FAILURE" and "exit status 9 before writing its final status" in last["message"]


def test_killing_the_child_job_stops_the_engine_and_publishes_the_failure(tmp_path, dataset):
    """A real engine job (train, tiny model) killed through the launcher: SIGTERM, FAILURE, published."""
    paths = jobs.JobPaths.resolve(job="d/r/train", results_root=str(tmp_path / "results"))
    planned = {"dataset.train.img_dir": str(dataset / "train" / "images.tar.gz"),
               "dataset.train.panoptic_json": str(dataset / "train" / "annotations_panoptic.json"),
               "dataset.train.panoptic_dir": str(dataset / "train" / "images_panoptic.tar.gz"),
               "dataset.label_map": str(dataset / "train" / "label_map_panoptic.json"),
               "dataset.train.type": "coco_panoptic"}
    launcher = LocalProcessLauncher(kill_grace_s=10)
    spec = overrides.job_overrides("train", tiny_overrides(**{"train.num_epochs": 50}), planned)
    job = launcher.describe(action="train", paths=paths, overrides=spec, check_interval=0.5)
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("code", launcher.run(job, {}, lambda line: None)))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not results.read_status(paths.local_dir):  # the engine has started
        time.sleep(0.2)
    engines = [p for p in psutil.process_iter(["cmdline"]) if "mask2former" in (p.info["cmdline"] or [])
               and str(paths.local_dir) in (p.info["cmdline"] or [])]
    launcher.kill()
    runner.join(timeout=60)
    assert box["code"] != 0
    assert engines and all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in engines)
    assert (paths.local_dir / "_FINISHED").is_file()  # the failed attempt is published too
    assert results.read_status(paths.local_dir)[-1]["status"] == "FAILURE"


# ------------------------------------------------------------------------------------ the trigger


def _trigger(job: Path, **kwargs) -> Mask2FormerJobTrigger:
    defaults = {"job_uri": str(job), "aws_conn_id": None, "check_interval": 0.05, "started_at": time.time(),
                "startup_timeout": 5.0, "stale_after": 60.0}
    return Mask2FormerJobTrigger(**{**defaults, **kwargs})


async def _first(trigger):
    async for event in trigger.run():
        return event.payload


class _TaskLog(list):
    """Collects what the trigger logs (in the triggerer this goes to the task's log)."""

    def info(self, message, *args):
        self.append(message % args if args else message)


def test_the_trigger_streams_status_lines_and_fires_once_the_job_is_published(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    trigger = _trigger(job)
    trigger._log = task_log = _TaskLog()
    classpath, kwargs = trigger.serialize()
    assert classpath == "operators.triggers.job.Mask2FormerJobTrigger" and Mask2FormerJobTrigger(**kwargs).job_uri

    def the_job():
        time.sleep(0.2)
        LOCAL.beat(str(job), host="h", pid=1)
        results.StatusWriter(job).running("epoch 1 done", epoch=1, max_epoch=2, kpi={"mIoU": 1.5})
        results.StatusWriter(job).success("train finished")
        time.sleep(0.3)  # the final line is seen before the folder is published: the trigger waits
        LOCAL.publish(job, str(job))

    threading.Thread(target=the_job).start()
    event = asyncio.run(_first(trigger))
    assert event == {"status": "success", "job_uri": str(job), "message": "train finished"}
    assert task_log == [f"following job {job}", 'status.json: [RUNNING] epoch 1 done, epoch 1/2, kpi {"mIoU": 1.5}',
                        "status.json: [SUCCESS] train finished"]


def test_the_trigger_fails_a_dead_job_and_stops_one_past_its_deadline(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    never = asyncio.run(_first(_trigger(job, startup_timeout=0.2)))
    assert never["status"] == "error" and "no heartbeat within" in never["message"]
    LOCAL.beat(str(job), host="h", pid=1)
    time.sleep(0.3)
    dead = asyncio.run(_first(_trigger(job, started_at=time.time() - 10, stale_after=0.2)))
    assert dead["status"] == "error" and "its process or pod died" in dead["message"]
    late = asyncio.run(_first(_trigger(job, deadline=time.time() - 1)))
    assert late["status"] == "error" and "job_timeout" in late["message"]
    assert LOCAL.stop_requested(str(job)) == "the job ran past its job_timeout"
    LOCAL.clear_job_controls(str(job))
    asyncio.run(_trigger(job).on_kill())
    assert LOCAL.stop_requested(str(job)) == "the Airflow task was stopped by a user"


def test_a_retried_task_follows_its_still_running_job_instead_of_starting_another(tmp_path, dataset, monkeypatch):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"),
                                  eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                  results_root=str(tmp_path / "results"), spec_overrides=tiny_overrides(),
                                  check_interval=0.2)
    context = fake_context(task_id="train")
    paths = op.job_paths(context)
    paths.local_dir.mkdir(parents=True)
    LOCAL.beat(paths.publish_uri, host="worker-1", pid=4242)  # the earlier attempt's job, still alive
    monkeypatch.setattr(LocalProcessLauncher, "run", lambda *args: pytest.fail("a second job was started"))
    monkeypatch.setattr(LocalProcessLauncher, "start", lambda *args: pytest.fail("a second job was started"))

    def the_job_ends():
        time.sleep(0.5)
        fake_train_folder(paths.local_dir)
        LOCAL.beat(paths.publish_uri, host="worker-1", pid=4242, exit_code=0)
        LOCAL.publish(paths.local_dir, paths.publish_uri)

    threading.Thread(target=the_job_ends).start()
    outcome = op.execute(context)
    assert outcome["status"] == "SUCCESS" and outcome["results_dir"] == paths.publish_uri
    # OpenLineage (the provider calls this once the task completed): dataset roots in, models out
    lineage = op.get_openlineage_facets_on_complete(None)
    assert {(d.namespace, d.name) for d in lineage.inputs} == {("file", str(dataset / "train")),
                                                               ("file", str(dataset / "val"))}
    outputs = {(d.namespace, d.name) for d in lineage.outputs}
    assert ("file", paths.publish_uri) in outputs
    assert ("file", outcome["artifacts"]["checkpoint"]) in outputs


def test_without_waiting_the_task_returns_once_its_detached_job_is_launched(tmp_path, dataset):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"),
                                  eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                  results_root=str(tmp_path / "results"), wait_for_completion=False,
                                  spec_overrides=tiny_overrides(**{"train.num_epochs": 50}), check_interval=0.5)
    paths = op.job_paths(fake_context(task_id="train"))
    began = time.monotonic()
    outcome = op.execute(fake_context(task_id="train"))
    assert time.monotonic() - began < 30 and outcome["results_dir"] == paths.publish_uri
    assert outcome["status"] in (None, "STARTED") and outcome["artifacts"] == {}
    beat = _wait(lambda: LOCAL.last_beat(paths.publish_uri), 120)  # the detached job runs on its own
    job = psutil.Process(beat["pid"])
    assert os.getsid(job.pid) == job.pid  # a session of its own: detached from the task
    job.terminate()  # as a deploy stopping the machine would: the job stops its engine and publishes
    _wait(lambda: LOCAL.is_finished(paths.publish_uri), 120)
    assert results.read_status(paths.local_dir)[-1]["status"] == "FAILURE"
    assert "received SIGTERM" in results.read_status(paths.local_dir)[-1]["message"]


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"not done after {timeout} s")


# ------------------------------------------------------------------------------------ GPU stages


def test_gen_trt_engine_is_skipped_without_a_gpu_and_runs_with_one(tmp_path, monkeypatch):
    op = Mask2FormerGenTrtEngineOperator(task_id="gen_trt_engine")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AirflowSkipException, match="needs a CUDA GPU.*nvidia-smi is not on PATH"):
        op.check_can_run()
    # A stand-in nvidia-smi (a shell script, not NVIDIA's tool) that lists one GPU.
    stand_in = tmp_path / "bin" / "nvidia-smi"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", str(stand_in.parent))
    op.check_can_run()
    stand_in.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    with pytest.raises(AirflowSkipException, match="nvidia-smi lists no GPU"):
        op.check_can_run()
    pod_op = Mask2FormerGenTrtEngineOperator(task_id="g2", launcher=KubernetesPodLauncher(image="i"))
    pod_op.check_can_run()  # the pod asks the cluster for its GPU


# ------------------------------------------------------------------- partitions and the champion


def test_partition_choice_follows_the_run_type(tmp_path, aws_conn):
    import datetime as dt
    from types import SimpleNamespace

    import mask2former_partitions as partitions

    for name in ("2024-01-01", "2024-01-08", "eval", "notes.txt"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    root = str(tmp_path)
    assert partitions.list_partitions(root, LOCAL) == ["2024-01-01", "2024-01-08"]

    def choose(**kwargs):
        return partitions.choose_partition(root, LOCAL, **kwargs)

    # scheduled and backfill runs: the logical date's partition; none is a skip with its reason
    for run_type in ("scheduled", "backfill"):
        chosen = choose(run_type=run_type, logical_date=dt.datetime(2024, 1, 1, 3))
        assert chosen.uri == str(tmp_path / "2024-01-01") and "logical date 2024-01-01" in chosen.reason
    with pytest.raises(partitions.NoNewData, match="no new data for 2024-01-15"):
        choose(run_type="scheduled", logical_date=dt.datetime(2024, 1, 15, 3))
    # manual runs (the UI form's logical date is "now"; the REST API may send none): the newest, or the param
    for logical_date in (dt.datetime(2026, 12, 6, 4, 31), None):
        chosen = choose(run_type="manual", logical_date=logical_date)
        assert chosen.partition == "2024-01-08" and "newest" in chosen.reason
    assert choose(run_type="manual", requested="2024-01-01").partition == "2024-01-01"
    with pytest.raises(FileNotFoundError, match="2024-01-15.*2024-01-01, 2024-01-08"):
        choose(run_type="manual", requested="2024-01-15")
    # asset-triggered: the run's partition key, the event's partition key or extra, else the newest
    event = SimpleNamespace(asset=SimpleNamespace(name="data"), partition_key=None, extra={"partition": "2024-01-01"})
    assert choose(run_type="asset_triggered", asset_events=[event]).partition == "2024-01-01"
    keyed = SimpleNamespace(asset=SimpleNamespace(name="data"), partition_key="2024-01-01", extra={})
    assert "partition key" in choose(run_type="asset_triggered", asset_events=[keyed]).reason
    assert choose(run_type="asset_triggered", partition_key="2024-01-01").partition == "2024-01-01"
    plain = SimpleNamespace(asset=SimpleNamespace(name="data"), partition_key=None, extra={})
    assert choose(run_type="asset_triggered", asset_events=[plain]).partition == "2024-01-08"
    bucket = new_bucket(aws_conn)
    client = s3_client(aws_conn)
    for key in ("data/2024-01-01/images.tar.gz", "data/2024-02-05/images.tar.gz", "data/eval/images.tar.gz"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert partitions.list_partitions(f"s3://{bucket}/data", Mask2FormerStorageHook()) == ["2024-01-01", "2024-02-05"]


def test_champion_decision_and_record_round_trip(tmp_path, aws_conn):
    import mask2former_champion as champion

    assert champion.decide(challenger=2.0, champion=None, eval_dataset="e")["decision"] == "promote"
    keep = champion.decide(challenger=2.0, champion=2.0, eval_dataset="e")
    assert keep["decision"] == "keep" and keep["challenger"] == 2.0 and keep["champion"] == 2.0
    assert champion.decide(challenger=2.5, champion=2.0, eval_dataset="e")["decision"] == "promote"
    with pytest.raises(ValueError, match="no mIoU"):
        champion.decide(challenger=None, champion=1.0, eval_dataset="e")
    assert champion.needs_evaluation({"eval_dataset": "a"}, "b") and not champion.needs_evaluation(None, "b")
    assert champion.metric_of({"metrics": {"mIoU": 4.0}}) == 4.0
    record = champion.champion_record(dag_id="d", run_id="r", partition="p", eval_dataset="e", value=2.5,
                                      train={"action": "train"}, evaluation={"metrics": {"mIoU": 2.5}}, export=None,
                                      engine=None)
    for root in (str(tmp_path), f"s3://{new_bucket(aws_conn)}/results"):
        assert champion.read_champion(root, Mask2FormerStorageHook()) is None
        champion.write_champion(root, record, Mask2FormerStorageHook())
        assert champion.read_champion(root, Mask2FormerStorageHook()) == record
