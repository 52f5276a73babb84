"""Score predictions already on disk (``evaluate.predictions``) against a dataset's ground truth.

Accepted, in the formats :mod:`mask2former.evaluation.writers` writes (and panopticapi / COCO use):

- a COCO-panoptic predictions JSON (a dict with ``annotations``); its PNGs lie in the folder beside it
  named after the JSON's stem (``panoptic.json`` -> ``panoptic/``) -> PQ/SQ/RQ;
- a COCO results JSON (a list of ``{image_id, category_id, segmentation (RLE), score}``) -> mask AP;
- a folder of semantic PNGs of raw category ids, one per image named like the image with suffix .png
  -> mIoU, fwIoU, pixel and mean accuracy.

Predictions are matched to the ground truth by image id (JSON) or by file name (PNG folder). The ground
truth is the same as for a model's evaluation (the dataset through its label map, at original size) and
the same mask2former.metrics evaluators score it, so scoring the files an inference run wrote gives the
numbers the evaluation of that model gives.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..data.dataset import SegmentationDataset
from ..metrics import read_panoptic_png, read_png
from .pipeline import Evaluator, has_panoptic_ground_truth
from .predictions import ImagePrediction
from .writers import prediction_png_name

Progress = Callable[[int, int], None]
DETECTION_KEYS = {"image_id", "category_id", "segmentation", "score"}


class PredictionFilesError(ValueError):
    """Prediction files that cannot be scored; the message names the file and what was expected."""


def prediction_kind(path: Path) -> str:
    """'semantic' (a folder), 'panoptic' (JSON dict with annotations) or 'instance' (JSON list)."""
    if path.is_dir():
        return "semantic"
    if not path.is_file():
        raise PredictionFilesError(f"evaluate.predictions='{path}' does not exist")
    if path.suffix.lower() != ".json":
        raise PredictionFilesError(f"evaluate.predictions='{path}' is neither a folder of semantic PNGs nor a .json "
                                   "file (COCO-panoptic predictions or COCO results)")
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return "panoptic"
    if isinstance(data, list):
        return "instance"
    raise PredictionFilesError(f"{path}: expected a COCO-panoptic predictions dict with 'annotations' or a COCO "
                               f"results list, got a {type(data).__name__} with keys "
                               f"{sorted(data)[:8] if isinstance(data, dict) else '-'}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PredictionFilesError(f"{path} is not valid JSON: {exc}") from None


def score_prediction_files(path: Path, dataset: SegmentationDataset,
                           progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Metrics of the predictions at ``path`` on every image of ``dataset`` (see the module docstring)."""
    path = Path(path)
    kind = prediction_kind(path)
    if kind == "panoptic" and not has_panoptic_ground_truth(dataset):
        raise PredictionFilesError(f"{path} holds panoptic predictions, but PQ needs COCO-panoptic ground truth "
                                   f"(dataset.val.type coco_panoptic); the validation data is COCO instances")
    instance_gt = dataset.coco_instance_ground_truth() if kind == "instance" else None
    if kind == "instance" and not instance_gt["categories"]:
        raise PredictionFilesError(f"{path} holds instance detections, but the label map has no thing class to "
                                   "score mask AP on")
    evaluator = Evaluator(label_map=dataset.label_map, ground_truth=dataset.load_ground_truth, host=None,
                          semantic=kind == "semantic", panoptic=kind == "panoptic", instance_ground_truth=instance_gt)
    read = {"semantic": _semantic_reader, "panoptic": _panoptic_reader, "instance": _instance_reader}[kind](path)
    total = len(dataset.records)
    for done, record in enumerate(dataset.records, start=1):
        prediction = ImagePrediction(image_id=record.image_id, file_name=record.file_name,
                                     orig_size=(record.height, record.width), sem_seg=None)
        try:
            read(prediction)
            evaluator.update(prediction)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise PredictionFilesError(f"{path}: image {record.image_id} ({record.file_name}): {exc}") from exc
        if progress is not None:
            progress(done, total)
    metrics = evaluator.compute()
    metrics["predictions"] = {"path": str(path), "kind": kind}
    return metrics


def _semantic_reader(folder: Path) -> Callable[[ImagePrediction], None]:
    def read(prediction: ImagePrediction) -> None:
        png = folder / prediction_png_name(prediction.file_name)
        if not png.is_file():
            raise FileNotFoundError(f"no semantic PNG {png}")
        array = read_png(png)  # "L" / "I;16" / "P": the stored ids, within the pixel limit
        if array.ndim != 2:
            raise ValueError(f"{png} has shape {array.shape}; expected a single-channel PNG of raw category ids")
        prediction.sem_seg = array.astype(np.int32)
    return read


def _panoptic_reader(json_path: Path) -> Callable[[ImagePrediction], None]:
    folder = json_path.with_suffix("")
    if not folder.is_dir():
        raise PredictionFilesError(f"{json_path}: its PNG folder {folder} (named after the JSON's stem) does not exist")
    annotations = {int(a["image_id"]): a for a in _load_json(json_path)["annotations"]}

    def read(prediction: ImagePrediction) -> None:
        annotation = annotations.get(prediction.image_id)
        if annotation is None:
            raise KeyError(f"{json_path.name} has no annotation for this image_id")
        prediction.panoptic_seg = read_panoptic_png(folder / annotation["file_name"])
        prediction.segments_info = list(annotation.get("segments_info", []))
    return read


def _instance_reader(json_path: Path) -> Callable[[ImagePrediction], None]:
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for position, detection in enumerate(_load_json(json_path)):
        if not isinstance(detection, dict) or not DETECTION_KEYS <= set(detection):
            raise PredictionFilesError(f"{json_path}: entry {position} needs image_id, category_id, segmentation "
                                       f"(RLE) and score")
        by_image[int(detection["image_id"])].append(detection)

    def read(prediction: ImagePrediction) -> None:
        prediction.instances = by_image.get(prediction.image_id, [])
    return read
