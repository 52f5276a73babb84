"""plan_data_sources: the per-action data-source overrides of a job's dataset roots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mask2former.data.sources import (
    join_uri,
    local_path_of,
    parse_s3_uri,
    plan_data_sources,
    uri_scheme,
)

TRAIN = "s3://bucket/train"
EVAL = "s3://bucket/val"
REPO = Path(__file__).resolve().parents[1]


def everything(_uri: str) -> bool:
    return True


def expected_overrides(action: str, fmt: str, *, with_eval: bool = True) -> dict[str, str]:
    """The table of the brief, written out independently of the implementation."""
    label_map = "label_map_panoptic.json" if fmt == "coco_panoptic" else "label_map.json"
    table = {
        "dataset.train.type": fmt,
        "dataset.train.img_dir": f"{TRAIN}/images.tar.gz",
        "dataset.label_map": f"{TRAIN}/{label_map}",
        "dataset.train.instance_json": f"{TRAIN}/annotations.json",
        "dataset.train.panoptic_json": f"{TRAIN}/annotations_panoptic.json",
        "dataset.train.panoptic_dir": f"{TRAIN}/images_panoptic.tar.gz",
    }
    if with_eval:
        table.update({
            "dataset.val.type": fmt,
            "dataset.val.img_dir": f"{EVAL}/images.tar.gz",
            "dataset.val.instance_json": f"{EVAL}/annotations.json",
            "dataset.val.panoptic_json": f"{EVAL}/annotations_panoptic.json",
            "dataset.val.panoptic_dir": f"{EVAL}/images_panoptic.tar.gz",
            "dataset.test.img_dir": f"{EVAL}/images.tar.gz",
        })
    if action == "quantize":
        table["dataset.quant_calibration_dataset.images_dir"] = f"{TRAIN}/images.tar.gz"
    return table


@pytest.mark.parametrize("fmt", ["coco", "coco_panoptic"])
@pytest.mark.parametrize("action", ["train", "evaluate", "inference", "quantize"])
def test_data_actions_get_the_full_table(action: str, fmt: str) -> None:
    plan = plan_data_sources(action, TRAIN, EVAL, fmt, exists=everything)
    assert plan == expected_overrides(action, fmt)


@pytest.mark.parametrize("action", ["train", "evaluate", "inference", "quantize"])
def test_ade_roots_give_the_jsonl_and_the_root_archive(action: str) -> None:
    table = {
        "dataset.train.type": "ade",
        "dataset.label_map": f"{TRAIN}/label_map.json",
        "dataset.train.annot_file": f"{TRAIN}/annotations.jsonl",
        "dataset.train.root_dir": f"{TRAIN}/root.tar.gz",
        "dataset.val.type": "ade",
        "dataset.val.annot_file": f"{EVAL}/annotations.jsonl",
        "dataset.val.root_dir": f"{EVAL}/root.tar.gz",
        "dataset.test.img_dir": f"{EVAL}/images.tar.gz",
    }
    if action == "quantize":
        table["dataset.quant_calibration_dataset.images_dir"] = f"{TRAIN}/images.tar.gz"
    assert plan_data_sources(action, TRAIN, EVAL, "ade", exists=everything) == table


def test_train_panoptic_table_literally() -> None:
    plan = plan_data_sources("train", ["s3://b/t/"], "s3://b/v", "coco_panoptic", exists=everything)
    assert plan == {
        "dataset.train.type": "coco_panoptic",
        "dataset.val.type": "coco_panoptic",
        "dataset.train.img_dir": "s3://b/t/images.tar.gz",
        "dataset.label_map": "s3://b/t/label_map_panoptic.json",
        "dataset.train.instance_json": "s3://b/t/annotations.json",
        "dataset.train.panoptic_json": "s3://b/t/annotations_panoptic.json",
        "dataset.train.panoptic_dir": "s3://b/t/images_panoptic.tar.gz",
        "dataset.val.img_dir": "s3://b/v/images.tar.gz",
        "dataset.val.instance_json": "s3://b/v/annotations.json",
        "dataset.val.panoptic_json": "s3://b/v/annotations_panoptic.json",
        "dataset.val.panoptic_dir": "s3://b/v/images_panoptic.tar.gz",
        "dataset.test.img_dir": "s3://b/v/images.tar.gz",
    }


@pytest.mark.parametrize("action", ["export", "gen_trt_engine"])
@pytest.mark.parametrize("fmt", ["coco", "coco_panoptic", None])
def test_export_and_engine_take_no_data(action: str, fmt: str | None) -> None:
    def never(uri: str) -> bool:
        raise AssertionError(f"exists({uri!r}) must not be called for {action}")

    assert plan_data_sources(action, TRAIN, EVAL, fmt, exists=never) == {}
    assert plan_data_sources(action, None, None, fmt, exists=never) == {}


@pytest.mark.parametrize("action", ["train", "evaluate", "inference", "quantize"])
def test_without_eval_dataset_val_and_test_keys_are_left_out(action: str) -> None:
    plan = plan_data_sources(action, TRAIN, None, "coco_panoptic", exists=everything)
    assert plan == expected_overrides(action, "coco_panoptic", with_eval=False)
    assert not [key for key in plan if key.startswith(("dataset.val.", "dataset.test."))]


def test_missing_files_are_left_out_and_each_uri_is_asked_once() -> None:
    asked: list[str] = []

    def exists(uri: str) -> bool:
        asked.append(uri)
        return "panoptic" not in uri

    plan = plan_data_sources("quantize", TRAIN, EVAL, "coco_panoptic", exists=exists)
    assert "dataset.train.panoptic_json" not in plan and "dataset.val.panoptic_dir" not in plan
    assert "dataset.label_map" not in plan  # label_map_panoptic.json is "missing" too
    assert plan["dataset.quant_calibration_dataset.images_dir"] == f"{TRAIN}/images.tar.gz"
    assert plan["dataset.val.type"] == "coco_panoptic"  # formats are not files
    assert len(asked) == len(set(asked))  # images.tar.gz of train serves two keys, asked once


def test_default_exists_checks_local_files(tmp_path: Path) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    for root in (train, val):
        root.mkdir()
        (root / "images.tar.gz").write_bytes(b"x")
        (root / "annotations.json").write_text("{}")
    (train / "label_map.json").write_text("[]")
    plan = plan_data_sources("train", str(train), f"file://{val}", "coco")
    assert plan == {
        "dataset.train.type": "coco",
        "dataset.val.type": "coco",
        "dataset.train.img_dir": str(train / "images.tar.gz"),
        "dataset.label_map": str(train / "label_map.json"),
        "dataset.train.instance_json": str(train / "annotations.json"),
        "dataset.val.img_dir": f"file://{val}/images.tar.gz",
        "dataset.val.instance_json": f"file://{val}/annotations.json",
        "dataset.test.img_dir": f"file://{val}/images.tar.gz",
    }


def test_s3_roots_need_an_exists_that_can_ask_s3() -> None:
    """The engine holds no S3 client here: the Airflow side plans S3 roots with its storage hook's exists()
    (tests/airflow/test_storage_hook.py)."""
    with pytest.raises(ValueError, match="planning S3 sources needs an exists"):
        plan_data_sources("evaluate", TRAIN, None, "coco_panoptic")


def test_unknown_action_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"unknown action 'fit'.*'train'.*'gen_trt_engine'"):
        plan_data_sources("fit", TRAIN, EVAL, "coco", exists=everything)


@pytest.mark.parametrize("action", ["train", "export"])
def test_unknown_format_is_refused_with_the_allowed_values(action: str) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset format 'voc'.*'coco'.*'coco_panoptic'"):
        plan_data_sources(action, TRAIN, EVAL, "voc", exists=everything)


@pytest.mark.parametrize("train", [None, [], ["s3://a/x", "s3://a/y"], ""])
def test_train_dataset_must_be_exactly_one_root(train: object) -> None:
    with pytest.raises(ValueError, match="train_datasets for action 'train' must be one dataset root"):
        plan_data_sources("train", train, EVAL, "coco", exists=everything)  # type: ignore[arg-type]


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unsupported URI scheme 'gs'.*s3://, file://"):
        plan_data_sources("train", "gs://bucket/train", None, "coco", exists=everything)


def test_uri_helpers() -> None:
    assert join_uri("s3://b", "x.json") == "s3://b/x.json"
    assert join_uri("s3://b/p//", "x.json") == "s3://b/p/x.json"
    assert join_uri("file:///data/set/", "x.json") == "file:///data/set/x.json"
    assert join_uri("/data/set", "x.json") == "/data/set/x.json"
    assert parse_s3_uri("s3://b/a/b.tar.gz").key == "a/b.tar.gz"
    assert local_path_of("file:///data/my%20set/x") == "/data/my set/x"
    assert local_path_of("file://localhost/d") == "/d"
    assert uri_scheme("relative/path") == ""
    with pytest.raises(ValueError, match="names no bucket"):
        parse_s3_uri("s3:///key")
    with pytest.raises(ValueError, match="must be local"):
        local_path_of("file://otherhost/d")


def test_light_modules_import_without_torch_or_airflow() -> None:
    code = (
        "import sys; import mask2former.data.sources, mask2former.data.staging, mask2former.data.archives; "
        "heavy = [m for m in ('torch', 'airflow', 'boto3') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
