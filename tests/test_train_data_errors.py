"""Bad dataset inputs end the train action with exit code 1, FAILURE in status.json and one sentence that
names the file and the problem (through ``python -m mask2former train``: the real command once, the same
``cli.main`` in-process for the other cases)."""

from __future__ import annotations

import copy
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from mask2former import cli
from mask2former.results import read_status
from train_support import make_data, run_train_cli, tiny_spec, write_spec


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"coco": make_data(base / "coco", dataset_format="coco", images=4, val_images=2),
            "coco_panoptic": make_data(base / "pan", dataset_format="coco_panoptic", images=4, val_images=2)}


def _extract(archive: Path, folder: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _missing_label_map(spec: Dict[str, Any], tmp: Path) -> str:
    spec["dataset"]["label_map"] = str(tmp / "nowhere" / "label_map.json")
    return r"label map .*nowhere/label_map.json \(dataset.label_map\) does not exist"


def _label_map_not_json(spec: Dict[str, Any], tmp: Path) -> str:
    bad = tmp / "label_map.json"
    bad.write_text("[{id: 1,")
    spec["dataset"]["label_map"] = str(bad)
    return r"label map .*label_map.json is not valid JSON"


def _raw_id_over_num_classes(spec: Dict[str, Any], tmp: Path) -> str:
    spec["model"]["sem_seg_head"]["num_classes"] = 10
    return (r"label map .*label_map.*json: category id 12 \('triangle'\) is >= model.sem_seg_head.num_classes=10; "
            r".*set model.sem_seg_head.num_classes to at least 13 or set dataset.contiguous_id true")


def _image_missing_from_folder(spec: Dict[str, Any], tmp: Path) -> str:
    folder = _extract(Path(spec["dataset"]["train"]["img_dir"]), tmp / "images")
    (folder / "000003.jpg").unlink()
    spec["dataset"]["train"]["img_dir"] = str(folder)
    return r"dataset.train: annotation file .*annotations.json names image '000003.jpg' \(id 3\), which is not in"


def _annotation_of_unknown_image(spec: Dict[str, Any], tmp: Path) -> str:
    source = Path(spec["dataset"]["train"]["instance_json"])
    data = json.loads(source.read_text())
    data["annotations"][0]["image_id"] = 999
    target = tmp / "annotations.json"
    target.write_text(json.dumps(data))
    spec["dataset"]["train"]["instance_json"] = str(target)
    return r"dataset.train: annotation file .*annotations.json: annotation \d+ refers to image_id 999"


def _missing_annotation_file(spec: Dict[str, Any], tmp: Path) -> str:
    spec["dataset"]["val"]["panoptic_json"] = str(tmp / "absent.json")
    return r"^dataset.val.panoptic_json: annotation file .*absent.json does not exist"


def _panoptic_png_missing(spec: Dict[str, Any], tmp: Path) -> str:
    folder = _extract(Path(spec["dataset"]["train"]["panoptic_dir"]), tmp / "panoptic")
    (folder / "000002.png").unlink()
    spec["dataset"]["train"]["panoptic_dir"] = str(folder)
    return r"dataset.train: annotation file .*annotations_panoptic.json names panoptic PNG .*000002.png"


def _corrupt_image(spec: Dict[str, Any], tmp: Path) -> str:
    """Found only when the sample is loaded (in a DataLoader worker), not when the annotations are read."""
    folder = _extract(Path(spec["dataset"]["train"]["img_dir"]), tmp / "images")
    (folder / "000002.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    spec["dataset"]["train"]["img_dir"] = str(folder)
    spec["dataset"]["train"]["num_workers"] = 1
    return r"^dataset.train: image .*000002.jpg could not be read"


CASES: Dict[str, tuple] = {
    "missing label map": ("coco_panoptic", _missing_label_map),
    "label map not JSON": ("coco_panoptic", _label_map_not_json),
    "raw id >= num_classes": ("coco_panoptic", _raw_id_over_num_classes),
    "image missing from img_dir": ("coco", _image_missing_from_folder),
    "annotation names a missing image": ("coco", _annotation_of_unknown_image),
    "missing annotation file": ("coco_panoptic", _missing_annotation_file),
    "panoptic PNG missing": ("coco_panoptic", _panoptic_png_missing),
    "corrupt image": ("coco_panoptic", _corrupt_image),
}


def _prepare(roots, tmp_path: Path, dataset_format: str, mutate: Callable) -> tuple:
    mode = "panoptic" if dataset_format == "coco_panoptic" else "instance"
    spec = tiny_spec(roots[dataset_format], dataset_format=dataset_format, mode=mode)
    spec = copy.deepcopy(spec)
    pattern = mutate(spec, tmp_path)
    return write_spec(tmp_path / "spec.yaml", spec), pattern


def _assert_failure(folder: Path, pattern: str) -> str:
    lines = read_status(folder)
    assert lines[-1]["status"] == "FAILURE", lines
    assert [line["status"] for line in lines].count("SUCCESS") == 0
    message = lines[-1]["message"]
    assert "\n" not in message and "Traceback" not in message, message
    assert re.search(pattern, message), (pattern, message)
    return message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_fails_with_one_sentence(case, roots, tmp_path, capsys):
    dataset_format, mutate = CASES[case]
    spec_path, pattern = _prepare(roots, tmp_path, dataset_format, mutate)
    code = cli.main(["train", "-e", str(spec_path), "--results-dir", str(tmp_path / "run")])
    assert code == 1
    message = _assert_failure(tmp_path / "run", pattern)
    assert f"error: {message}" in capsys.readouterr().err  # printed without a traceback
    assert not list((tmp_path / "run").glob("*.pth"))


def test_real_command_reports_a_bad_dataset(roots, tmp_path):
    spec_path, pattern = _prepare(roots, tmp_path, "coco", _image_missing_from_folder)
    result = run_train_cli(spec_path, tmp_path / "run")
    assert result.returncode == 1, result.stderr[-2000:]
    message = _assert_failure(tmp_path / "run", pattern)
    assert f"error: {message}" in result.stderr and "Traceback" not in result.stderr
