"""The inference action: outputs exist and decode at the original size, overlays with a legend, archives
with mixed-case extensions, label map from the checkpoint, and the round trip inference ->
evaluate.predictions == evaluate with the checkpoint."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from evaluation_support import (OracleRunner, make_dataset, save_random_checkpoint, small_data_overrides,
                                split_overrides, tiny_model_overrides)
from mask2former import results, runtime
from mask2former.cli import main
from mask2former.config import load_spec
from mask2former.data.build import build_datasets
from mask2former.evaluation.overlays import LEGEND_WIDTH
from mask2former.metrics import read_panoptic_png

SYNTHETIC_IDS = {1, 2, 3, 7, 9, 12}


def cli_words(overrides):
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_images=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")


def _inference_overrides(data, checkpoint, mode="panoptic", **extra):
    return {**tiny_model_overrides(mode), **small_data_overrides(), "dataset.test.img_dir": str(data["img_dir"]),
            "dataset.label_map": str(data["label_map"]), "inference.checkpoint": str(checkpoint),
            "model.object_mask_threshold": 0.05, **extra}


def _image_sizes(data):
    images = json.loads(data["panoptic_json"].read_text())["images"]
    return {image["file_name"]: (image["height"], image["width"]) for image in images}


def test_panoptic_inference_writes_decodable_outputs_at_the_original_size(tmp_path, data, checkpoint):
    folder = tmp_path / "job"
    overrides = _inference_overrides(data, checkpoint, **{"inference.batch_size": 3,
                                                          "dataset.test.panoptic_json": str(data["panoptic_json"])})
    assert main(["inference", "--results-dir", str(folder), *cli_words(overrides)]) == 0
    assert results.read_status(folder)[-1]["status"] == "SUCCESS"
    sizes = _image_sizes(data)
    ids = {image["file_name"]: image["id"] for image in json.loads(data["panoptic_json"].read_text())["images"]}
    panoptic = json.loads((folder / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == len(sizes) == 4  # batch 3: no tail dropped
    assert {c["id"] for c in panoptic["categories"]} == SYNTHETIC_IDS
    segments = 0
    for annotation in panoptic["annotations"]:
        image_name = annotation["file_name"].replace(".png", ".jpg")
        assert annotation["image_id"] == ids[image_name]  # ids from dataset.test.panoptic_json
        seg = read_panoptic_png(folder / "panoptic" / annotation["file_name"])
        assert seg.shape == sizes[image_name]
        listed = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(seg).tolist()) - {0} == set(listed)
        for segment_id, segment in listed.items():
            assert segment["category_id"] in SYNTHETIC_IDS
            assert segment["area"] == int((seg == segment_id).sum())
        segments += len(listed)
        semantic = np.asarray(Image.open(folder / "semantic" / annotation["file_name"]))
        assert semantic.shape == sizes[image_name]
        assert set(np.unique(semantic).tolist()) <= SYNTHETIC_IDS | {255}
        overlay = Image.open(folder / "overlays" / annotation["file_name"].replace(".png", ".jpg"))
        assert overlay.size[0] == sizes[image_name][1] + LEGEND_WIDTH
    assert segments > 0
    detections = json.loads((folder / "instances.json").read_text())
    assert detections, "panoptic mode also writes the instance head's thing detections"
    for detection in detections:
        assert detection["category_id"] in {7, 9, 12}  # things only, as upstream in panoptic mode
        size = tuple(detection["segmentation"]["size"])
        assert size in sizes.values()
        assert mask_utils.decode(detection["segmentation"]).shape == size
        assert len(detection["bbox"]) == 4 and 0 <= detection["score"] <= 1


def test_instance_inference_on_an_archive_with_mixed_case_extensions(tmp_path, data, checkpoint):
    archive = tmp_path / "images.tar.gz"
    names = {"A.JPG": "000001.jpg", "b.png": "000002.jpg", "sub/c.Jpeg": "000003.jpg"}
    with tarfile.open(archive, "w:gz") as tar:
        for target, source in names.items():
            buffer = io.BytesIO()
            image = Image.open(data["img_dir"] / source)
            image.save(buffer, format="PNG" if target.endswith("png") else "JPEG")
            info = tarfile.TarInfo(target)
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    folder = tmp_path / "job"
    overrides = _inference_overrides(data, checkpoint, mode="instance", **{
        "dataset.test.img_dir": str(archive), "inference.save_overlays": False, "inference.batch_size": 2})
    assert main(["inference", "--results-dir", str(folder), *cli_words(overrides)]) == 0
    assert sorted(p.relative_to(folder / "semantic").as_posix() for p in (folder / "semantic").rglob("*.png")) == \
        ["A.png", "b.png", "sub/c.png"]
    assert not (folder / "panoptic.json").exists() and not (folder / "overlays").exists()
    detections = json.loads((folder / "instances.json").read_text())
    assert {d["image_id"] for d in detections} == {0, 1, 2}  # positions in the sorted listing
    assert results.read_metrics(folder)["num_images"] == 3


def test_the_label_map_recorded_in_the_checkpoint_is_used_when_the_spec_names_none(tmp_path, data):
    entries = json.loads(data["label_map"].read_text())
    recorded = save_random_checkpoint(tmp_path / "with_map.pth", label_map=entries)
    overrides = _inference_overrides(data, recorded, mode="semantic", **{"inference.save_overlays": True})
    del overrides["dataset.label_map"]
    folder = tmp_path / "job"
    assert main(["inference", "--results-dir", str(folder), *cli_words(overrides)]) == 0
    assert len(list((folder / "overlays").glob("*.jpg"))) == 4
    bare = save_random_checkpoint(tmp_path / "bare.pth")
    folder = tmp_path / "job2"
    assert main(["inference", "--results-dir", str(folder),
                 *cli_words(dict(overrides, **{"inference.checkpoint": str(bare)}))]) == 1
    assert "dataset.label_map is not set" in results.read_status(folder)[-1]["message"]


@pytest.fixture
def oracle_model(tmp_path, data, monkeypatch):
    """evaluate.onnx_file / inference.onnx_file naming this file run an OracleRunner on the dataset."""
    config = load_spec("evaluate", overrides={**tiny_model_overrides("panoptic"), **small_data_overrides(),
                                              **split_overrides("val", data), "evaluate.onnx_file": "x.onnx"})
    oracle = OracleRunner(build_datasets(config, "val"))
    monkeypatch.setattr(runtime, "_REGISTERED", {"onnx": lambda path, config, device: oracle})
    path = tmp_path / "oracle.onnx"
    path.write_bytes(b"stand-in")
    return path


@pytest.mark.parametrize("model", ["checkpoint", "oracle"])
def test_inference_then_evaluate_predictions_equals_evaluate_with_the_model(tmp_path, data, checkpoint,
                                                                           oracle_model, model):
    key, path = ("checkpoint", checkpoint) if model == "checkpoint" else ("onnx_file", oracle_model)
    evaluate = {**tiny_model_overrides("panoptic"), **small_data_overrides(), **split_overrides("val", data),
                "model.object_mask_threshold": 0.05, "evaluate.batch_size": 1}
    direct = tmp_path / "direct"
    assert main(["evaluate", "--results-dir", str(direct), *cli_words({**evaluate, f"evaluate.{key}": str(path)})]) == 0
    expected = results.read_metrics(direct)
    if model == "oracle":  # known, high scores: the comparison below is not between zeros
        assert expected["PQ"] > 85 and expected["AP"] > 60 and expected["mIoU"] > 90, expected
    inference = tmp_path / "inference"
    overrides = _inference_overrides(data, checkpoint, **{
        "inference.batch_size": 1, "inference.save_overlays": False,
        "dataset.test.panoptic_json": str(data["panoptic_json"])})
    del overrides["inference.checkpoint"]
    overrides[f"inference.{key}"] = str(path)
    assert main(["inference", "--results-dir", str(inference), *cli_words(overrides)]) == 0
    for source, keys in (("semantic", ("mIoU", "fwIoU", "pixel_accuracy", "mean_accuracy")),
                         ("panoptic.json", ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")),
                         ("instances.json", ("AP", "AP50", "AP75", "APs"))):
        folder = tmp_path / f"scored_{source}"
        assert main(["evaluate", "--results-dir", str(folder),
                     *cli_words({**evaluate, "evaluate.predictions": str(inference / source)})]) == 0
        scored = results.read_metrics(folder)
        assert scored["num_images"] == expected["num_images"] == 4
        for metric in keys:
            assert scored[metric] == expected[metric], (source, metric)
        group = {"semantic": "semantic", "panoptic.json": "panoptic", "instances.json": "instance"}[source]
        assert scored["per_class"][group] == expected["per_class"][group]
        assert results.read_status(folder)[-1]["kpi"]


def test_evaluate_predictions_names_what_is_wrong_with_the_files(tmp_path, data):
    evaluate = {**tiny_model_overrides("panoptic"), **small_data_overrides(), **split_overrides("val", data)}
    semantic = tmp_path / "semantic"
    semantic.mkdir()
    folder = tmp_path / "job"
    assert main(["evaluate", "--results-dir", str(folder),
                 *cli_words({**evaluate, "evaluate.predictions": str(semantic)})]) == 1
    assert "no semantic PNG" in results.read_status(folder)[-1]["message"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"info": 1}')
    folder = tmp_path / "job2"
    assert main(["evaluate", "--results-dir", str(folder),
                 *cli_words({**evaluate, "evaluate.predictions": str(bad)})]) == 1
    assert "COCO-panoptic predictions dict" in results.read_status(folder)[-1]["message"]


def test_writer_keeps_raw_ids_above_254_in_16_bit_semantic_pngs_and_draws_a_legend(tmp_path):
    from mask2former.data.label_map import LabelEntry, LabelMap
    from mask2former.evaluation.overlays import render_overlay
    from mask2former.evaluation.predictions import ImagePrediction
    from mask2former.evaluation.writers import PredictionWriter

    label_map = LabelMap(entries=[LabelEntry(id=3, name="road", color=(10, 20, 30), isthing=False),
                                  LabelEntry(id=300, name="car", color=(250, 0, 0), isthing=True)],
                         contiguous_id=True, num_classes=2)
    sem_seg = np.full((6, 10), 3, dtype=np.int32)
    sem_seg[2:4, 5:9] = 300
    sem_seg[5, 9] = 255
    prediction = ImagePrediction(image_id=5, file_name="dir/x.jpeg", orig_size=(6, 10), sem_seg=sem_seg)
    writer = PredictionWriter(out_dir=tmp_path, label_map=label_map, save_overlays=False)
    writer.write(prediction)
    with pytest.raises(ValueError, match="would both write dir/x.png"):
        writer.write(ImagePrediction(image_id=6, file_name="dir/x.png", orig_size=(6, 10), sem_seg=sem_seg))
    assert writer.close() == {"semantic": tmp_path / "semantic"}
    stored = np.asarray(Image.open(tmp_path / "semantic" / "dir" / "x.png"))
    assert stored.dtype == np.uint16 and np.array_equal(stored, sem_seg)
    image = np.zeros((6, 10, 3), dtype=np.uint8)
    overlay = np.asarray(render_overlay(image, prediction, label_map))
    assert overlay.shape[:2] == (max(6, 4 + 2 * 18 + 4), 10 + LEGEND_WIDTH)
    assert tuple(overlay[2, 6]) == (125, 0, 0)  # car at half alpha over black
    assert tuple(overlay[0, 2]) == (5, 10, 15)  # road
    assert tuple(overlay[3, 6]) == (255, 255, 255)  # boundary between car and road
    assert tuple(overlay[5, 9]) == (0, 0, 0)  # void pixels stay as they were
