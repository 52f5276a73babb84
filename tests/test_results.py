"""Results folder: status lines, metrics, best record, parent-model resolution."""

import json

import pytest

from mask2former import results


def touch(path):
    path.write_bytes(b"x")
    return path


def test_status_lines_are_json_lines_ending_with_the_final_status(tmp_path):
    writer = results.StatusWriter(tmp_path)
    writer.started("train started")
    writer.running("epoch 1/2", epoch=1, max_epoch=2, eta="0:01:00", kpi={"loss": 1.5})
    writer.success("done", kpi={"mIoU": 50.0})
    lines = [json.loads(l) for l in (tmp_path / "status.json").read_text().splitlines()]
    assert [l["status"] for l in lines] == ["STARTED", "RUNNING", "SUCCESS"]
    assert lines[1]["epoch"] == 1 and lines[1]["kpi"] == {"loss": 1.5}
    assert {"date", "time", "status", "message"} <= set(lines[0])
    assert results.final_status(tmp_path) == "SUCCESS"


def test_torn_last_status_line_is_skipped(tmp_path):
    writer = results.StatusWriter(tmp_path)
    writer.started("x")
    with open(tmp_path / "status.json", "a") as fh:
        fh.write('{"status": "RUNN')
    assert [l["status"] for l in results.read_status(tmp_path)] == ["STARTED"]


def test_unknown_status_is_refused(tmp_path):
    with pytest.raises(ValueError):
        results.StatusWriter(tmp_path).write("DONE", "x")


def test_checkpoint_names_and_listing(tmp_path):
    assert results.checkpoint_name(3, 120) == "model_epoch_003_step_000120.pth"
    for epoch, step in [(2, 20), (10, 100), (1, 10)]:
        touch(tmp_path / results.checkpoint_name(epoch, step))
    touch(tmp_path / "model_epoch_x.pth")
    assert [(c.epoch, c.step) for c in results.list_checkpoints(tmp_path)] == [(1, 10), (2, 20), (10, 100)]


def test_resolve_best_latest_and_epoch(tmp_path):
    for epoch in (1, 2, 3):
        touch(tmp_path / results.checkpoint_name(epoch, epoch * 10))
    touch(tmp_path / results.LATEST_CHECKPOINT)
    results.record_best(tmp_path, epoch=2, step=20, metric="mIoU", value=55.0,
                        checkpoint=results.checkpoint_name(2, 20))
    assert results.resolve_parent_model(tmp_path).name == "model_epoch_002_step_000020.pth"
    assert results.resolve_parent_model(tmp_path, choose="latest_model").name == "model_latest.pth"
    assert results.resolve_parent_model(tmp_path, choose="from_epoch_number", epoch=3).name == \
        "model_epoch_003_step_000030.pth"


def test_best_falls_back_to_latest_without_validation(tmp_path):
    touch(tmp_path / results.checkpoint_name(1, 5))
    assert results.resolve_parent_model(tmp_path).name == "model_epoch_001_step_000005.pth"


def test_tao_result_folders_resolve_best_latest_and_epoch(tmp_path):
    """A folder of NVIDIA TAO's training: 5-digit steps, Lightning's older `epoch=` names with `-vN` versions,
    and the `mask2former_model_latest.pth` link (a symlink, as TAO writes it)."""
    for name in ("model_epoch_008_step_00900.pth", "model_epoch_009_step_01000.pth", "model_epoch=099.pth",
                 "model_epoch=099-v1.pth", "model_epoch=012_step=01300.pth"):
        touch(tmp_path / name)
    assert results.resolve_parent_model(tmp_path).name == "model_epoch=099-v1.pth"  # no record: the newest
    assert results.resolve_parent_model(tmp_path, choose="from_epoch_number", epoch=9).name == \
        "model_epoch_009_step_01000.pth"
    assert results.resolve_parent_model(tmp_path, choose="from_epoch_number", epoch=12).name == \
        "model_epoch=012_step=01300.pth"
    assert results.resolve_parent_model(tmp_path, choose="from_epoch_number", epoch=99).name == \
        "model_epoch=099-v1.pth"
    (tmp_path / "mask2former_model_latest.pth").symlink_to(tmp_path / "model_epoch_009_step_01000.pth")
    for choose in ("best_model", "latest_model"):
        assert results.resolve_parent_model(tmp_path, choose=choose).name == "mask2former_model_latest.pth"
    assert results.list_checkpoints(tmp_path) == []  # train resumes from its own names only


def test_resolve_other_kinds(tmp_path):
    touch(tmp_path / "model.onnx")
    touch(tmp_path / "model.engine")
    touch(tmp_path / "quantized_model_torchao.pth")
    assert results.resolve_parent_model(tmp_path, "onnx").name == "model.onnx"
    assert results.resolve_parent_model(tmp_path, "engine").name == "model.engine"
    assert results.resolve_parent_model(tmp_path, "quantized").name == "quantized_model_torchao.pth"


def test_nothing_matches_lists_the_folder(tmp_path):
    touch(tmp_path / "metrics.json")
    with pytest.raises(results.ParentModelError, match="holds: metrics.json"):
        results.resolve_parent_model(tmp_path, "onnx")
    with pytest.raises(results.ParentModelError, match="No checkpoint of epoch 7"):
        results.resolve_parent_model(tmp_path, choose="from_epoch_number", epoch=7)
    with pytest.raises(results.ParentModelError, match="does not exist"):
        results.resolve_parent_model(tmp_path / "nope")


def test_metrics_round_trip_atomically(tmp_path):
    results.write_metrics(tmp_path, {"mIoU": 42.0})
    assert results.read_metrics(tmp_path) == {"mIoU": 42.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
