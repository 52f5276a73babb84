"""Helpers for the evaluation, inference and runtime tests: a tiny model spec, random-weight checkpoints,
small synthetic datasets with non-square images of different sizes, and an oracle that turns ground truth
into runner outputs."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.checkpoint import save_checkpoint
from mask2former.config import load_spec
from mask2former.data.coco_panoptic import id_to_rgb, rgb_to_id
from mask2former.data.label_map import LabelMap
from mask2former.data.synthetic import write_dataset
from mask2former.model import build_model

NUM_CLASSES = 13  # synthetic raw ids go up to 12 (contiguous_id false)
# (height, width) crops of the 96 x 96 synthetic images: non-square, different sizes.
CROPS = ((96, 72), (64, 96), (80, 80), (72, 50), (96, 96))


def tiny_model_overrides(mode: str = "panoptic", **extra: Any) -> Dict[str, Any]:
    """Dotted ``model.*`` overrides of a tiny Swin Mask2Former, plus ``extra``."""
    overrides = {
        "model.mode": mode,
        "model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
        "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.backbone.swin.drop_path_rate": 0.0,
        "model.sem_seg_head.num_classes": NUM_CLASSES, "model.sem_seg_head.convs_dim": 32,
        "model.sem_seg_head.mask_dim": 32, "model.sem_seg_head.transformer_enc_layers": 1,
        "model.mask_former.num_object_queries": 6, "model.mask_former.hidden_dim": 32,
        "model.mask_former.nheads": 2, "model.mask_former.dim_feedforward": 64, "model.mask_former.dec_layers": 2,
        "model.test_topk_per_image": 10,
    }
    overrides.update(extra)
    return overrides


def small_data_overrides() -> Dict[str, Any]:
    """Small test-time resize and no loader workers (2-core machines)."""
    return {"dataset.augmentation.test_min_size": 64, "dataset.augmentation.test_max_size": 96,
            "dataset.val.num_workers": 0, "dataset.test.num_workers": 0}


def save_random_checkpoint(path: Path, *, mode: str = "panoptic", seed: int = 0,
                           label_map: Optional[List[dict]] = None, sharpen: bool = True) -> Path:
    """A checkpoint of the tiny model with random weights. ``sharpen`` scales the class head so some
    queries pass the panoptic score threshold (random logits are otherwise near-uniform)."""
    config = load_spec("export", overrides=tiny_model_overrides(mode, **{"export.checkpoint": str(path)}))
    torch.manual_seed(seed)
    model = build_model(config.model)
    state = model.state_dict()
    if sharpen:
        for key in state:
            if "class_embed" in key:
                state[key] = state[key] * 30.0
    save_checkpoint(path, {"state_dict": state, "model_config": dataclasses.asdict(config.model),
                           "label_map": label_map, "contiguous_id": False, "epoch": 0, "global_step": 0})
    return path


def _extract(archive: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def make_dataset(root: Path, *, dataset_format: str = "coco_panoptic", num_images: int = 5, seed: int = 0,
                 crops: Sequence[Tuple[int, int]] = CROPS) -> Dict[str, Path]:
    """A synthetic dataset whose images are cropped to ``crops`` (cycled): non-square, of different sizes.

    Returns the paths: img_dir, label_map, instance_json, and for coco_panoptic panoptic_json / panoptic_dir.
    """
    source = write_dataset(root / "source", dataset_format=dataset_format, num_images=num_images, size=96,
                           seed=seed, stream=1)
    img_dir = _extract(source / "images.tar.gz", root / "images")
    sizes = {}
    instances = json.loads((source / "annotations.json").read_text())
    for position, image in enumerate(instances["images"]):
        height, width = crops[position % len(crops)]
        path = img_dir / image["file_name"]
        Image.open(path).crop((0, 0, width, height)).save(path, quality=95)
        sizes[image["id"]] = (height, width)
        image.update(height=height, width=width)
    kept = []
    for annotation in instances["annotations"]:
        height, width = sizes[annotation["image_id"]]
        full = mask_util.decode(mask_util.frPyObjects(annotation["segmentation"], 96, 96)
                                if isinstance(annotation["segmentation"], list) or
                                isinstance(annotation["segmentation"].get("counts"), list)
                                else annotation["segmentation"])
        if full.ndim == 3:
            full = full.max(axis=2)
        mask = np.asfortranarray(full[:height, :width].astype(np.uint8))
        if not mask.any():
            continue
        rle = mask_util.encode(mask)
        annotation.update(segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                          area=float(mask_util.area(rle)), bbox=[float(v) for v in mask_util.toBbox(rle)])
        kept.append(annotation)
    instances["annotations"] = kept
    paths = {"img_dir": img_dir, "instance_json": root / "annotations.json"}
    (root / "annotations.json").write_text(json.dumps(instances))
    if dataset_format == "coco":
        paths["label_map"] = source / "label_map.json"
        return paths
    png_dir = _extract(source / "images_panoptic.tar.gz", root / "panoptic")
    panoptic = json.loads((source / "annotations_panoptic.json").read_text())
    for image in panoptic["images"]:
        image.update(height=sizes[image["id"]][0], width=sizes[image["id"]][1])
    for annotation in panoptic["annotations"]:
        height, width = sizes[annotation["image_id"]]
        path = png_dir / annotation["file_name"]
        ids = rgb_to_id(np.asarray(Image.open(path).convert("RGB")))[:height, :width]
        Image.fromarray(id_to_rgb(ids)).save(path)
        present, counts = np.unique(ids, return_counts=True)
        areas = dict(zip(present.tolist(), counts.tolist()))
        annotation["segments_info"] = [dict(s, area=int(areas[s["id"]])) for s in annotation["segments_info"]
                                       if s["id"] in areas]
    (root / "annotations_panoptic.json").write_text(json.dumps(panoptic))
    paths.update(panoptic_json=root / "annotations_panoptic.json", panoptic_dir=png_dir,
                 label_map=source / "label_map_panoptic.json")
    return paths


def split_overrides(split: str, paths: Mapping[str, Path], dataset_format: str = "coco_panoptic") -> Dict[str, Any]:
    """dataset.<split>.* and dataset.label_map overrides naming a :func:`make_dataset` result."""
    overrides: Dict[str, Any] = {f"dataset.{split}.type": dataset_format,
                                 f"dataset.{split}.img_dir": str(paths["img_dir"]),
                                 "dataset.label_map": str(paths["label_map"])}
    if dataset_format == "coco_panoptic":
        overrides[f"dataset.{split}.panoptic_json"] = str(paths["panoptic_json"])
        overrides[f"dataset.{split}.panoptic_dir"] = str(paths["panoptic_dir"])
    else:
        overrides[f"dataset.{split}.instance_json"] = str(paths["instance_json"])
    return overrides


def load_label_map(paths: Mapping[str, Path]) -> LabelMap:
    return LabelMap.load(paths["label_map"], contiguous_id=False, num_classes=NUM_CLASSES)


def _to_quarter(mask: np.ndarray, meta: Mapping[str, Any]) -> torch.Tensor:
    """A [H, W] bool mask at the original size -> a float map at 1/4 of the padded input, as the network sees
    the image (resized to image_size, padded bottom/right)."""
    image_h, image_w = meta["image_size"]
    padded_h, padded_w = meta["padded_size"]
    resized = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(image_h, image_w),
                            mode="bilinear", align_corners=False)[0, 0]
    canvas = torch.zeros(padded_h, padded_w)
    canvas[:image_h, :image_w] = resized
    return F.avg_pool2d(canvas[None, None], 4)[0, 0]


def oracle_outputs(metas: Sequence[Mapping[str, Any]], ground_truths: Sequence[Any], label_map: LabelMap, *,
                   num_queries: int = 12) -> Dict[str, torch.Tensor]:
    """Runner outputs (all modes) that reproduce each image's ground truth up to the 1/4-resolution
    round trip: one query per ground-truth segment, class prob 1, mask = the segment."""
    padded_h, padded_w = metas[0]["padded_size"]
    batch, num_classes = len(metas), label_map.num_classes
    sem = torch.zeros(batch, num_classes, padded_h // 4, padded_w // 4)
    pan_scores = torch.zeros(batch, num_queries)
    pan_classes = torch.full((batch, num_queries), -1, dtype=torch.int64)
    pan_probs = torch.zeros(batch, num_queries, padded_h // 4, padded_w // 4)
    for b, (meta, gt) in enumerate(zip(metas, ground_truths)):
        segments = [s for s in gt.segments_info if not s["iscrowd"]][:num_queries]
        for q, segment in enumerate(segments):
            index = label_map.index_of(segment["category_id"])
            quarter = _to_quarter(gt.panoptic_seg == segment["id"], meta)
            sem[b, index] = torch.maximum(sem[b, index], quarter)
            pan_scores[b, q], pan_classes[b, q] = 1.0, index
            pan_probs[b, q] = quarter
    inst_logits = torch.logit(pan_probs.clamp(1e-4, 1 - 1e-4))
    return {"sem_scores": sem, "pan_scores": pan_scores, "pan_classes": pan_classes, "pan_mask_probs": pan_probs,
            "inst_scores": pan_scores.clone(), "inst_classes": pan_classes.clamp(min=0),
            "inst_mask_logits": inst_logits}


class OracleRunner:
    """A runner (any input size) whose outputs reproduce the ground truth of the dataset images it is given,
    recognised by their pixels: a model with known, high scores for end-to-end checks of the actions.

    Args:
        dataset: the SegmentationDataset whose images will be run (its eval transform must be the job's).
    """

    fixed_input_size = None
    max_batch_size = None
    mode = "panoptic"

    def __init__(self, dataset: Any) -> None:
        from mask2former.data.images import load_rgb
        from mask2former.data.transforms import Sample

        self.label_map = dataset.label_map
        self.num_classes = dataset.label_map.num_classes
        self._images = {}
        for record in dataset.records:
            sample = dataset.transform(Sample(image=load_rgb(record.path)))
            key = self._key(torch.from_numpy(sample.image))
            self._images[key] = (sample.size, dataset.load_ground_truth(record.image_id), record)

    @staticmethod
    def _key(image: torch.Tensor) -> bytes:
        return image[:, :8, :8].contiguous().numpy().tobytes()

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        metas, truths = [], []
        for image in images:
            image_size, gt, record = self._images[self._key(image)]
            metas.append({"image_size": image_size, "padded_size": tuple(images.shape[-2:])})
            truths.append(gt)
        return oracle_outputs(metas, truths, self.label_map)
