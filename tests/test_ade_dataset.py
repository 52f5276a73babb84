"""TAO's `ade` dataset type: a JSONL of {"img", "segm"} pairs under root_dir, label PNG values are category ids
and 0 is ignored. Read as TAO reads it; train, evaluate (mIoU) and inference in semantic mode, from disk and
staged from S3; a TAO result folder's checkpoint evaluates and fine-tunes on it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mask2former import results
from mask2former.cli import main
from mask2former.config import load_spec
from mask2former.data.build import build_datasets
from mask2former.data.synthetic import generate
from mask2former.data.sources import plan_data_sources
from s3_server import moto_endpoint, moto_server, new_bucket, s3_env  # noqa: F401
from train_support import tiny_spec, write_spec


def ade_split(root: Path, *, batch_size: int = 2) -> dict:
    return {"type": "ade", "annot_file": str(root / "annotations.jsonl"), "root_dir": str(root / "root.tar.gz"),
            "batch_size": batch_size, "num_workers": 0}


def ade_spec(roots: dict, *, num_epochs: int = 1) -> dict:
    """The tiny network of the training tests on ade roots, semantic mode, as a TAO spec names them."""
    spec = tiny_spec(roots, dataset_format="coco", mode="semantic", num_epochs=num_epochs)
    spec["dataset"]["train"] = ade_split(roots["train"])
    spec["dataset"]["val"] = ade_split(roots["val"])
    spec["dataset"]["test"] = {"img_dir": str(roots["val"] / "images.tar.gz")}
    spec["dataset"]["label_map"] = str(roots["train"] / "label_map.json")
    return spec


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ade"), dataset_format="ade", num_images=4, size=64, seed=0,
                    val_images=2)


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_label_values_are_category_ids_and_zero_is_ignored(tmp_path):
    """A hand-made TAO-style root: relative paths from the annot_file's folder (root_dir empty)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.full((8, 12, 3), 128, dtype=np.uint8)).save(tmp_path / "images" / "a.jpg")
    labels = np.zeros((8, 12), dtype=np.uint8)
    labels[:, 4:8] = 3
    labels[:, 8:] = 40  # not in the label map: void, like 0
    (tmp_path / "annotations" / "a.png").write_bytes(_png(labels))
    (tmp_path / "train.jsonl").write_text('{"img": "images/a.jpg", "segm": "annotations/a.png"}\n\n')
    (tmp_path / "label_map.json").write_text(json.dumps([{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]))
    config = load_spec("evaluate", overrides={
        "dataset.val.type": "ade", "dataset.val.annot_file": str(tmp_path / "train.jsonl"),
        "dataset.label_map": str(tmp_path / "label_map.json"), "model.mode": "semantic",
        "model.sem_seg_head.num_classes": 8, "evaluate.checkpoint": str(tmp_path / "unused.pth")})
    dataset = build_datasets(config, "val")
    truth = dataset.load_ground_truth(dataset.image_ids()[0])
    assert truth.sem_seg.shape == (8, 12)
    assert (truth.sem_seg[:, :4] == 255).all() and (truth.sem_seg[:, 4:8] == 3).all() and \
        (truth.sem_seg[:, 8:] == 255).all()
    item = dataset[0]
    assert item["labels"].tolist() == [3] and item["file_name"] == "images/a.jpg"


def test_refusals_name_the_file_and_the_line(tmp_path, roots):
    from mask2former.data.ade import AdeReader

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"img": "images/000001.jpg", "segm": "annotations/000001.png"}\n{"img": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: needs 'img' and 'segm'"):
        AdeReader(annotation_file=bad, root_dir=roots["train"] / "root.tar.gz")
    bad.write_text('{"img": "/etc/hostname", "segm": "annotations/000001.png"}\n')
    with pytest.raises(ValueError, match="must be a relative path"):
        AdeReader(annotation_file=bad, root_dir=roots["train"] / "root.tar.gz")
    bad.write_text('{"img": "images/nope.jpg", "segm": "annotations/000001.png"}\n')
    with pytest.raises(FileNotFoundError, match="line 1 names img 'images/nope.jpg'"):
        AdeReader(annotation_file=bad, root_dir=roots["train"] / "root.tar.gz")
    (tmp_path / "rgb.png").write_bytes(_png(np.zeros((4, 4), dtype=np.uint8), mode="RGB"))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    bad.write_text(json.dumps({"img": str(tmp_path / "a.jpg"), "segm": str(tmp_path / "rgb.png")}) + "\n")
    reader = AdeReader(annotation_file=bad)  # absolute paths without root_dir, as TAO takes them
    with pytest.raises(ValueError, match="mode RGB; ade labels are 8-bit grayscale"):
        reader.load_segments(0)


def test_ade_needs_semantic_mode_and_an_annot_file(tmp_path, roots):
    spec = ade_spec(roots)
    spec["model"]["mode"] = "panoptic"
    assert main(["train", "-e", str(write_spec(tmp_path / "s.yaml", spec)), "--results-dir",
                 str(tmp_path / "a")]) == 2
    spec["model"]["mode"] = "semantic"
    del spec["dataset"]["train"]["annot_file"]
    assert main(["train", "-e", str(write_spec(tmp_path / "s.yaml", spec)), "--results-dir",
                 str(tmp_path / "b")]) == 2


def _tao_checkpoint_folder(checkpoint: Path, folder: Path) -> Path:
    """The trained model as TAO's trainer would have written it: TAO names, no-object first, raw id j = class j."""
    from test_model_weights import _TO_DETECTRON2
    import re

    payload = torch.load(checkpoint, weights_only=True)
    state = {}
    for key, value in payload["state_dict"].items():
        for pattern, replacement in _TO_DETECTRON2:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        state[f"model.{key}"] = value
    for name in ("weight", "bias"):  # TAO: [no-object, raw ids 1..12]; our class 0 (raw id 0) never a target
        ours = state[f"model.sem_seg_head.predictor.class_embed.{name}"]
        state[f"model.sem_seg_head.predictor.class_embed.{name}"] = torch.cat([ours[-1:], ours[1:-1]])
    folder.mkdir(parents=True)
    torch.save({"epoch": 0, "global_step": 4, "state_dict": state, "tao_model": "mask2former"},
               folder / "model_epoch_000_step_00004.pth")
    (folder / "mask2former_model_latest.pth").symlink_to(folder / "model_epoch_000_step_00004.pth")
    return folder


def run_train(spec_path: Path, folder: Path, overrides=()) -> None:
    assert main(["train", "-e", str(spec_path), "--results-dir", str(folder), *overrides]) == 0, \
        results.read_status(folder)[-1:]


def model_and_data(spec: dict) -> dict:
    """The sections evaluate and inference read."""
    return {key: value for key, value in spec.items() if key in ("model", "dataset")}


@pytest.mark.slow
def test_train_evaluate_and_infer_on_an_ade_root_from_disk(tmp_path, roots, caplog):
    spec = ade_spec(roots)
    run_train(write_spec(tmp_path / "train.yaml", spec), tmp_path / "train")
    spec_path = write_spec(tmp_path / "spec.yaml", model_and_data(spec))
    assert "mIoU" in results.read_metrics(tmp_path / "train")

    assert main(["evaluate", "-e", str(spec_path), "--results-dir", str(tmp_path / "eval"),
                 f"evaluate.checkpoint={tmp_path / 'train'}"]) == 0
    metrics = results.read_metrics(tmp_path / "eval")
    assert 0 <= metrics["mIoU"] <= 100 and "PQ" not in metrics

    assert main(["inference", "-e", str(spec_path), "--results-dir", str(tmp_path / "infer"),
                 f"inference.checkpoint={tmp_path / 'train'}"]) == 0
    masks = sorted((tmp_path / "infer" / "semantic").rglob("*.png"))
    assert len(masks) == 2
    values = set(np.unique(np.asarray(Image.open(masks[0]))).tolist())
    assert values <= {1, 2, 3, 7, 9, 12, 255}  # raw category ids of the label map

    # the same model in a TAO result folder: evaluated through its *_latest.pth link, and fine-tuned from
    tao = _tao_checkpoint_folder(results.resolve_parent_model(tmp_path / "train"), tmp_path / "tao_train")
    assert main(["evaluate", "-e", str(spec_path), "--results-dir", str(tmp_path / "eval_tao"),
                 f"evaluate.checkpoint={tao}"]) == 0
    tao_miou = results.read_metrics(tmp_path / "eval_tao")["mIoU"]
    assert abs(tao_miou - metrics["mIoU"]) < 2.0, (tao_miou, metrics["mIoU"])
    caplog.set_level("INFO", logger="mask2former")
    run_train(tmp_path / "train.yaml", tmp_path / "tune", [
        f"train.pretrained_model_path={tao / 'model_epoch_000_step_00004.pth'}", "dataset.val.annot_file=null"])
    assert "from pretrained model" in caplog.text and "class head dropped" not in caplog.text


@pytest.mark.slow
def test_train_and_evaluate_on_ade_roots_staged_from_s3(tmp_path, roots, s3_env):  # noqa: F811
    import boto3

    from operators.hooks.storage import Mask2FormerStorageHook

    bucket = new_bucket(s3_env)
    client = boto3.client("s3")
    for split, root in roots.items():
        for path in root.iterdir():
            if path.is_file():
                client.upload_file(str(path), bucket, f"ade/{split}/{path.name}")
    hook = Mask2FormerStorageHook(aws_conn_id=None)
    planned = plan_data_sources("train", f"s3://{bucket}/ade/train", f"s3://{bucket}/ade/val", "ade",
                                exists=hook.exists)
    assert planned["dataset.val.root_dir"] == f"s3://{bucket}/ade/val/root.tar.gz"
    staged = hook.stage(planned, tmp_path / "cache", log=lambda line: None).local_overrides
    assert Path(staged["dataset.train.root_dir"]).is_dir() and Path(staged["dataset.val.annot_file"]).is_file()

    spec = ade_spec(roots)
    for split in ("train", "val"):
        spec["dataset"][split] = {"batch_size": 2, "num_workers": 0}
    del spec["dataset"]["label_map"]
    words = [f"{key}={value}" for key, value in staged.items()]
    run_train(write_spec(tmp_path / "train.yaml", spec), tmp_path / "train", words)
    spec_path = write_spec(tmp_path / "spec.yaml", model_and_data(spec))
    evaluate_words = [word for word in words if not word.startswith("dataset.train.")]
    assert main(["evaluate", "-e", str(spec_path), "--results-dir", str(tmp_path / "eval"),
                 f"evaluate.checkpoint={tmp_path / 'train'}", *evaluate_words]) == 0
    assert 0 <= results.read_metrics(tmp_path / "eval")["mIoU"] <= 100
    assert yaml.safe_load((tmp_path / "eval" / "experiment.yaml").read_text())["dataset"]["val"]["type"] == "ade"


def test_a_tar_with_one_top_folder_is_a_root_dir(tmp_path, roots):
    """A TAO user's tarred dataset folder (ADEChallengeData2016/images/..., .../annotations/...)."""
    from mask2former.data.ade import AdeReader

    archive = tmp_path / "ADEChallengeData2016.tar.gz"
    with tarfile.open(roots["val"] / "root.tar.gz") as source, tarfile.open(archive, "w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            member.name = f"ADEChallengeData2016/{member.name}"
            target.addfile(member, io.BytesIO(data))
    reader = AdeReader(annotation_file=roots["val"] / "annotations.jsonl", root_dir=archive)
    assert len(reader.records) == 2 and reader.load_segments(1).segments
