"""Synthetic data generator: exact data-source layout, valid annotations, determinism per seed."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mask2former.data.coco_panoptic import rgb_to_id
from mask2former.data.label_map import LabelMap
from mask2former.data.synthetic import generate, main

REPO = Path(__file__).resolve().parents[1]


def _members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_coco_panoptic_layout_and_consistency(tmp_path):
    root = generate(tmp_path, dataset_format="coco_panoptic", num_images=5, size=64, seed=1)["train"]
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations.json", "annotations_panoptic.json", "images.tar.gz", "images_panoptic.tar.gz",
        "label_map_panoptic.json"]
    panoptic = json.loads((root / "annotations_panoptic.json").read_text())
    jpegs, pngs = _members(root / "images.tar.gz"), _members(root / "images_panoptic.tar.gz")
    assert sorted(jpegs) == sorted(i["file_name"] for i in panoptic["images"])
    assert sorted(pngs) == sorted(a["file_name"] for a in panoptic["annotations"])
    ids = [c["id"] for c in panoptic["categories"]]
    assert ids == [1, 2, 3, 7, 9, 12] and ids != list(range(min(ids), min(ids) + len(ids)))
    label_map = LabelMap.load(root / "label_map_panoptic.json", contiguous_id=False, num_classes=13)
    assert label_map.thing_classes == {7, 9, 12} and label_map.stuff_classes == {1, 2, 3}
    for annotation in panoptic["annotations"]:
        segment_ids = rgb_to_id(np.asarray(Image.open(io.BytesIO(pngs[annotation["file_name"]])).convert("RGB")))
        assert segment_ids.shape == (64, 64)
        infos = annotation["segments_info"]
        assert {s["id"] for s in infos} == set(np.unique(segment_ids).tolist()) - {0}
        for info in infos:
            assert info["area"] == int((segment_ids == info["id"]).sum()) > 0
            assert info["category_id"] in ids
    instances = json.loads((root / "annotations.json").read_text())
    assert {c["id"] for c in instances["categories"]} == {7, 9, 12}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations.json"))
    for annotation in coco.dataset["annotations"]:
        assert coco.annToMask(annotation).sum() == annotation["area"] > 0


def test_coco_layout_and_label_map(tmp_path):
    root = generate(tmp_path, dataset_format="coco", num_images=3, size=48, seed=2)["train"]
    assert sorted(p.name for p in root.iterdir()) == ["annotations.json", "images.tar.gz", "label_map.json"]
    assert [e["id"] for e in json.loads((root / "label_map.json").read_text())] == [7, 9, 12]
    jpeg = next(iter(_members(root / "images.tar.gz").values()))
    assert Image.open(io.BytesIO(jpeg)).size == (48, 48)


def test_crowds_use_uncompressed_rle_and_objects_compressed(tmp_path):
    root = generate(tmp_path, dataset_format="coco", num_images=30, size=64, seed=0)["train"]
    annotations = json.loads((root / "annotations.json").read_text())["annotations"]
    crowd = [a for a in annotations if a["iscrowd"]]
    assert crowd, "30 images should hold at least one crowd"
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert all(isinstance(a["segmentation"]["counts"], str) for a in annotations if not a["iscrowd"])


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate(tmp_path / "a", dataset_format="coco_panoptic", num_images=3, size=64, seed=5)["train"]
    b = generate(tmp_path / "b", dataset_format="coco_panoptic", num_images=3, size=64, seed=5)["train"]
    c = generate(tmp_path / "c", dataset_format="coco_panoptic", num_images=3, size=64, seed=6)["train"]
    assert _digests(a) == _digests(b)
    assert _digests(a)["images.tar.gz"] != _digests(c)["images.tar.gz"]


def test_val_images_write_two_distinct_roots(tmp_path):
    roots = generate(tmp_path, dataset_format="coco_panoptic", num_images=3, size=64, seed=5, val_images=2)
    assert roots == {"train": tmp_path / "train", "val": tmp_path / "val"}
    train, val = _members(tmp_path / "train" / "images.tar.gz"), _members(tmp_path / "val" / "images.tar.gz")
    assert len(train) == 3 and len(val) == 2
    assert train["000001.jpg"] != val["000001.jpg"]
    single = generate(tmp_path / "single", dataset_format="coco_panoptic", num_images=3, size=64, seed=5)
    assert _members(single["train"] / "images.tar.gz") == train  # train content does not depend on --val-images


def test_classes_have_distinct_colours(tmp_path):
    """Learnability: each thing class has its own colour, far from the others and from the stuff."""
    root = generate(tmp_path, dataset_format="coco", num_images=12, size=64, seed=9)["train"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations.json"))
    jpegs = _members(root / "images.tar.gz")
    means = {}
    for annotation in coco.dataset["annotations"]:
        if annotation["iscrowd"] or annotation["area"] < 60:
            continue
        image = np.asarray(Image.open(io.BytesIO(jpegs[coco.imgs[annotation["image_id"]]["file_name"]])))
        means.setdefault(annotation["category_id"], []).append(image[coco.annToMask(annotation) > 0].mean(axis=0))
    centres = {k: np.mean(v, axis=0) for k, v in means.items()}
    assert set(centres) == {7, 9, 12}
    for a in centres:
        for b in centres:
            if a < b:
                assert np.abs(centres[a] - centres[b]).max() > 60


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--format", "coco", "--images", "2", "--size", "32", "--seed", "1"]) == 0
    assert (tmp_path / "x" / "label_map.json").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--format", "coco", "--images", "0"])
    assert "--images >= 1" in capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "mask2former.data.synthetic", str(tmp_path / "z"), "--format",
                           "coco_panoptic", "--images", "2", "--size", "32", "--val-images", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "z" / "val" / "images_panoptic.tar.gz").is_file()
