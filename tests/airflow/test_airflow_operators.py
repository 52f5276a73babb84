"""The operators' building blocks: job folders, overrides, spec building, parent models, outcomes,
launchers (a real engine subprocess, a Kubernetes pod spec built without a cluster), GPU detection,
partitions and the champion record. S3 is moto's server on 127.0.0.1, reached through the Airflow
connection ``aws_default`` as in production."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from helpers import fake_context, make_dataset, tiny_overrides, upload_tree
from mask2former.config import SpecError
from operators import jobs, outcome, overrides, parents, partitions, champion, remote
from operators.launchers import JobRequest, KubernetesPodLauncher, LocalProcessLauncher, StatusFollower, engine_env
from operators.mask2former_operators import (Mask2FormerEvaluateOperator, Mask2FormerGenTrtEngineOperator,
                                             Mask2FormerTrainOperator)
from s3_server import moto_endpoint, moto_server, new_bucket, s3_client  # noqa: F401 - pytest fixtures

SECRET = "m2f-test-secret-never-logged"


@pytest.fixture
def aws_conn(moto_endpoint, monkeypatch):
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


def test_overrides_are_validated_by_the_action_owning_their_section():
    overrides.validate_overrides("train", {"export.opset_version": 17, "evaluate.batch_size": 2})
    with pytest.raises(SpecError, match="export.opset_version.*99"):
        overrides.validate_overrides("train", {"export.opset_version": 99})
    with pytest.raises(SpecError, match="model.mask_former.hidden_dm.*hidden_dim"):
        overrides.validate_overrides("export", {"model.mask_former.hidden_dm": 32})
    with pytest.raises(SpecError, match="results_dir"):
        overrides.validate_overrides("train", {"results_dir": "/tmp/x"})
    assert overrides.overrides_for_action("export", {"export.opset_version": 17, "train.num_epochs": 2,
                                                     "model.mode": "semantic"}) == \
        {"export.opset_version": 17, "model.mode": "semantic"}


def test_literal_overrides_are_checked_at_construction_templated_ones_at_execute():
    with pytest.raises(SpecError, match="train.num_epochs.*0"):
        Mask2FormerTrainOperator(task_id="t", spec_overrides={"train.num_epochs": 0})
    with pytest.raises(SpecError, match="dataset_format 'cocoo'"):
        Mask2FormerTrainOperator(task_id="t", dataset_format="cocoo")
    op = Mask2FormerTrainOperator(task_id="t", spec_overrides={"train.num_epochs": "{{ params.epochs }}"},
                                  dataset_format="{{ params.fmt }}")
    assert op.spec_overrides == {"train.num_epochs": "{{ params.epochs }}"}
    Mask2FormerTrainOperator(task_id="t2", spec_overrides="{{ mask2former_overrides(params) }}")


# -------------------------------------------------------------------------------- spec building


def test_train_spec_takes_planned_sources_then_user_keys(dataset, tmp_path):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"),
                                  eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic")
    built = op.build_overrides(tiny_overrides(**{"dataset.val.img_dir": "/elsewhere/images"}), None)
    assert built["dataset.train.panoptic_json"] == str(dataset / "train" / "annotations_panoptic.json")
    assert built["dataset.label_map"] == str(dataset / "train" / "label_map_panoptic.json")
    assert built["dataset.val.img_dir"] == "/elsewhere/images"  # the user's key wins
    assert built["model.mask_former.hidden_dim"] == 32


def test_evaluate_spec_leaves_out_the_training_split_and_takes_the_parent_checkpoint(dataset, tmp_path):
    parent_dir = fake_train_folder(tmp_path / "train")
    op = Mask2FormerEvaluateOperator(task_id="evaluate", train_datasets=str(dataset / "train"),
                                     eval_dataset=str(dataset / "val"), dataset_format="coco_panoptic",
                                     parent={"action": "train", "results_dir": str(parent_dir)})
    built = op.build_overrides(tiny_overrides(), None)
    assert not any(k.startswith(("dataset.train.img_dir", "dataset.train.panoptic")) for k in built)
    assert built["dataset.val.panoptic_dir"] == str(dataset / "val" / "images_panoptic.tar.gz")
    assert built["evaluate.checkpoint"] == str(parent_dir / "model_epoch_001_step_000002.pth")
    assert "train.num_epochs" not in built


def test_spec_rule_errors_fail_the_task_without_retry(dataset):
    op = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"), dataset_format="coco")
    with pytest.raises(AirflowFailException, match="dataset.label_map is not set"):  # no label_map.json there
        op.build_overrides(tiny_overrides(), None)
    no_format = Mask2FormerTrainOperator(task_id="train", train_datasets=str(dataset / "train"))
    with pytest.raises(AirflowFailException, match="dataset_format is needed"):
        no_format.build_overrides({}, None)


# -------------------------------------------------------------------------------- parent models


@pytest.mark.parametrize("choose,epoch,expected", [("best_model", None, "model_epoch_001_step_000002.pth"),
                                                   ("latest_model", None, "model_latest.pth"),
                                                   ("from_epoch_number", 2, "model_epoch_002_step_000004.pth")])
def test_parent_checkpoint_follows_the_choose_method(tmp_path, choose, epoch, expected):
    folder = fake_train_folder(tmp_path / "train")
    parent = {"action": "train", "results_dir": str(folder)}
    assert parents.resolve_parent("export", parent, choose=choose, epoch=epoch, s3_client_factory=None) == \
        {"export.checkpoint": str(folder / expected)}
    assert parents.resolve_parent("quantize", parent, choose=choose, epoch=epoch, s3_client_factory=None) == \
        {"quantize.model_path": str(folder / expected)}


def test_parent_kinds_map_to_the_downstream_keys(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model.onnx").write_bytes(b"onnx")
    quant_dir = tmp_path / "quantize"
    quant_dir.mkdir()
    (quant_dir / "quantized_model_modelopt_onnx.onnx").write_bytes(b"q")
    onnx_parent = {"action": "export", "results_dir": str(export_dir)}
    kwargs = {"choose": "best_model", "epoch": None, "s3_client_factory": None}
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
    from functools import partial

    from mask2former.data.staging import airflow_s3_client_factory

    bucket = new_bucket(aws_conn)
    upload_tree(s3_client(aws_conn), fake_train_folder(tmp_path / "train", best_epoch=2), bucket, "results/d/r/train")
    parent = {"action": "train", "results_dir": f"s3://{bucket}/results/d/r/train"}
    found = parents.resolve_parent("evaluate", parent, choose="best_model", epoch=None,
                                   s3_client_factory=partial(airflow_s3_client_factory, "aws_default"))
    assert found == {"evaluate.checkpoint": f"s3://{bucket}/results/d/r/train/model_epoch_002_step_000004.pth"}


# ----------------------------------------------------- failing before staging (templated overrides)


@pytest.mark.parametrize("bad,key", [({"train.optim.lrr": 0.001}, "train.optim.lrr"),
                                     ({"train.num_epochs": 0}, "train.num_epochs"),
                                     ({"model.mode": "panoptik"}, "model.mode")])
def test_bad_rendered_override_fails_before_anything_is_staged(tmp_path, dataset, aws_conn, moto_server,
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
    assert "nothing was staged" in str(failure.value)
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
    from operators.links import Mask2FormerJobLink

    key = fake_context(dag_id="mask2former_pipeline", task_id="train")["ti"]
    url = Mask2FormerJobLink().get_link(None, ti_key=key)
    assert url == "http://localhost:8080/mask2former/jobs/mask2former_pipeline/manual__2024-01-01T00_00_00_00_00/train"


# ------------------------------------------------------------------------------------ launchers


def test_engine_environment_carries_no_credentials(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:secret@h/db")
    env = engine_env()
    assert "secret" not in json.dumps(env)
    assert str(Path(__file__).resolve().parents[2]) == env["PYTHONPATH"].split(os.pathsep)[0]


def test_status_follower_logs_each_new_complete_line(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"status": "STARTED", "message": "old attempt"}) + "\n")
    logged = []
    follower = StatusFollower(tmp_path, logged.append, poll_s=0.05).start()
    with open(tmp_path / "status.json", "a") as fh:
        fh.write(json.dumps({"status": "RUNNING", "message": "epoch", "epoch": 1, "max_epoch": 2,
                             "kpi": {"mIoU": 1.5}}) + "\n")
        fh.write('{"status": "RUN')  # a torn line: not logged until complete
        fh.flush()
        time.sleep(0.3)
        fh.write('NING", "message": "torn"}\n')
    follower.stop()
    assert logged == ['status.json: [RUNNING] epoch, epoch 1/2, kpi {"mIoU": 1.5}', "status.json: [RUNNING] torn"]


def test_killing_the_local_job_ends_its_process_group_and_fails_the_task(tmp_path, dataset):
    """A real engine job (train, tiny model) killed through on_kill: execute raises, never succeeds."""
    import psutil

    from mask2former.data.sources import plan_data_sources

    paths = jobs.JobPaths.resolve(job="d/r/train", results_root=str(tmp_path / "results"))
    planned = plan_data_sources("train", str(dataset / "train"), None, "coco_panoptic")
    request = JobRequest(action="train", overrides={**planned, **overrides.overrides_for_action("train", tiny_overrides())},
                         paths=paths, cache_dir=tmp_path / "cache", s3_client_factory=None, log=lambda line: None)
    launcher = LocalProcessLauncher(kill_grace_s=5)
    outcome_box = {}
    runner = threading.Thread(target=lambda: outcome_box.setdefault("error", _capture(launcher.run, request)))
    runner.start()
    deadline = time.monotonic() + 30
    while launcher._process is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = launcher._process.pid
    time.sleep(1.0)
    launcher.kill()
    runner.join(timeout=30)
    assert isinstance(outcome_box["error"], AirflowException)
    assert "was killed" in str(outcome_box["error"])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (paths.local_dir / "_FINISHED").is_file()  # the failed attempt is published too
    status = paths.local_dir / "status.json"
    assert not status.exists() or "SUCCESS" not in status.read_text()


def _capture(fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc
    return None


def test_kubernetes_pod_spec_is_built_without_a_cluster(tmp_path):
    """Only the pod spec is checked here: no Kubernetes cluster is reachable from the tests."""
    launcher = KubernetesPodLauncher(image="registry.example/mask2former-airflow:gpu", namespace="ml", gpus=2,
                                     aws_secret_name="mask2former-s3", memory="24Gi")
    paths = jobs.JobPaths.resolve(job="d/r/gen_trt_engine", results_root="s3://bucket/results")
    request = JobRequest(action="gen_trt_engine", overrides={"gen_trt_engine.onnx_file": "s3://bucket/x/model.onnx"},
                         paths=paths, cache_dir=tmp_path, s3_client_factory=None, log=lambda line: None)
    pod = launcher.build_operator(request, task_id="gen_trt_engine").build_pod_request_obj(dry_run=True)
    container = pod.spec.containers[0]
    assert container.image == "registry.example/mask2former-airflow:gpu"
    assert container.command == ["python", "-m", "operators.pod_job"]
    assert container.resources.limits["nvidia.com/gpu"] == "2" and container.resources.limits["memory"] == "24Gi"
    env = {e.name: e.value for e in container.env}
    job = json.loads(env["MASK2FORMER_POD_JOB"])
    assert job == {"action": "gen_trt_engine", "job_id": "d/r/gen_trt_engine",
                   "overrides": {"gen_trt_engine.onnx_file": "s3://bucket/x/model.onnx"},
                   "publish_uri": "s3://bucket/results/d/r/gen_trt_engine"}
    assert not any(name.startswith("AWS_") for name in env)  # credentials only through the Secret
    assert container.env_from[0].secret_ref.name == "mask2former-s3"
    assert pod.metadata.namespace == "ml"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    assert container.volume_mounts[0].mount_path == "/workspace"
    local = jobs.JobPaths.resolve(job="d/r/t", results_root=str(tmp_path))
    with pytest.raises(AirflowException, match="needs an s3:// results_root"):
        launcher.build_operator(JobRequest(action="train", overrides={}, paths=local, cache_dir=tmp_path,
                                           s3_client_factory=None, log=print), task_id="t")


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


# ------------------------------------------------------------------- S3 results, partitions, champion


def test_failed_attempt_checkpoints_are_restored_from_s3(tmp_path, aws_conn):
    from functools import partial

    from mask2former.data.staging import airflow_s3_client_factory

    factory = partial(airflow_s3_client_factory, "aws_default")
    bucket = new_bucket(aws_conn)
    upload_tree(s3_client(aws_conn), fake_train_folder(tmp_path / "attempt1"), bucket, "res/d/r/train")
    logged = []
    restored = remote.restore_job_folder(f"s3://{bucket}/res/d/r/train", tmp_path / "attempt2", factory, logged.append)
    names = sorted(p.name for p in (tmp_path / "attempt2").iterdir())
    assert restored == 5 and names == ["best_model.json", "model_epoch_001_step_000002.pth",
                                       "model_epoch_002_step_000004.pth", "model_latest.pth", "status.json"]
    assert remote.restore_job_folder(f"s3://{bucket}/res/d/r/train", tmp_path / "attempt2", factory, print) == 0


def test_partitions_by_logical_date_or_newest(tmp_path, aws_conn):
    import datetime as dt

    for name in ("2024-01-01", "2024-01-08", "eval", "notes.txt"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    assert partitions.list_partitions(str(tmp_path), None) == ["2024-01-01", "2024-01-08"]
    uri, why = partitions.select_partition(str(tmp_path), dt.datetime(2024, 1, 1, 3), None)
    assert uri == str(tmp_path / "2024-01-01") and "logical date" in why
    uri, why = partitions.select_partition(str(tmp_path), None, None)
    assert uri == str(tmp_path / "2024-01-08") and "newest" in why
    with pytest.raises(FileNotFoundError, match="2024-01-15.*2024-01-01, 2024-01-08"):
        partitions.select_partition(str(tmp_path), dt.datetime(2024, 1, 15), None)
    bucket = new_bucket(aws_conn)
    client = s3_client(aws_conn)
    for key in ("data/2024-01-01/images.tar.gz", "data/2024-02-05/images.tar.gz", "data/eval/images.tar.gz"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert partitions.list_partitions(f"s3://{bucket}/data", lambda: client) == ["2024-01-01", "2024-02-05"]


def test_champion_decision_and_record_round_trip(tmp_path, aws_conn):
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
    for root, factory in ((str(tmp_path), None), (f"s3://{new_bucket(aws_conn)}/results", lambda: s3_client(aws_conn))):
        assert champion.read_champion(root, factory) is None
        champion.write_champion(root, record, factory)
        assert champion.read_champion(root, factory) == record


def test_staging_makes_sources_local_and_leaves_urls_to_the_engine(tmp_path, dataset):
    from mask2former.data.sources import plan_data_sources
    from operators.prepare import SPEC_FILE, stage_and_write_spec

    import yaml

    planned = plan_data_sources("train", f"file://{dataset / 'train'}", None, "coco_panoptic")
    url = "https://example.invalid/swin_tiny_patch4_window7_224.pth"
    stage_and_write_spec(action="train", overrides={**planned, "model.backbone.pretrained_weights": url},
                         local_dir=tmp_path / "job", cache_dir=tmp_path / "cache", s3_client_factory=None,
                         log=lambda line: None)
    spec = yaml.safe_load((tmp_path / "job" / SPEC_FILE).read_text())
    assert spec["results_dir"] == str(tmp_path / "job")
    assert spec["model"]["backbone"]["pretrained_weights"] == url
    assert Path(spec["dataset"]["train"]["img_dir"]).is_dir()  # file:// images.tar.gz extracted into the cache
    assert spec["dataset"]["train"]["img_dir"].startswith(str(tmp_path / "cache"))
    assert spec["dataset"]["label_map"] == str(dataset / "train" / "label_map_panoptic.json")  # used in place
