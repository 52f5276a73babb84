"""The streaming evaluator shared by training validation and the evaluate action.

    evaluator = build_evaluator(cfg, dataset)          # cfg: ExperimentConfig, dataset: SegmentationDataset
    for batch in loader:                                # any loader whose metas carry image_id, file_name,
        outputs = model_or_runner(batch["images"])      # orig_size, image_size, padded_size
        evaluator.process(outputs, batch["metas"])      # raw pred_logits/pred_masks or runner outputs
    metrics = evaluator.compute()

Per image: the host stage (mask2former.evaluation.predictions) maps the outputs to the original size and
raw category ids, then the mask2former.metrics evaluators score them against the dataset's ground truth
at the original resolution:

- always: mIoU, fwIoU, pixel and mean accuracy from the semantic output (argmax of sem_scores);
- panoptic mode with COCO-panoptic ground truth: PQ/SQ/RQ for all, things and stuff;
- instance and panoptic mode with thing classes: COCO mask AP (AP, AP50, AP75, APs/m/l) from the instance
  head (top-k queries x classes; in panoptic mode restricted to thing classes, as upstream Mask2Former).

Nothing is kept per image beyond the evaluators' counts and the detections' RLEs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ..data.coco_panoptic import CocoPanopticReader
from ..data.dataset import SegmentationDataset
from ..data.label_map import LabelMap
from ..data.targets import GroundTruth
from ..metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
from .inputs import GroundTruthImages, batch_chunks, build_loader, input_transform
from .predictions import HostStage, ImagePrediction

SEMANTIC_KEYS = ("mIoU", "fwIoU", "pixel_accuracy", "mean_accuracy")
PANOPTIC_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
INSTANCE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
Progress = Callable[[int, int], None]


def has_panoptic_ground_truth(dataset: SegmentationDataset) -> bool:
    """True when the dataset's annotations are COCO panoptic (non-overlapping segments, PQ defined)."""
    return isinstance(dataset.reader, CocoPanopticReader)


class Evaluator:
    """Streams images into the semantic, panoptic and instance evaluators that apply.

    Args:
        label_map: the dataset's label map (raw ids, names, thing flags).
        ground_truth: image_id -> GroundTruth at the original size (used when a batch brings none).
        host: the host stage for model/runner outputs; None when only finished predictions are fed
            through :meth:`update` (scoring prediction files).
        semantic: score the semantic maps.
        panoptic: score panoptic segments (needs COCO-panoptic ground truth).
        instance_ground_truth: a COCO instances dict (thing categories) to score mask AP; None: no AP.
    """

    def __init__(self, *, label_map: LabelMap, ground_truth: Callable[[int], GroundTruth],
                 host: Optional[HostStage], semantic: bool, panoptic: bool,
                 instance_ground_truth: Optional[Dict[str, Any]]) -> None:
        self.label_map = label_map
        self.host = host
        self._ground_truth = ground_truth
        categories = label_map.categories()
        self.semantic = SemanticEvaluator.from_label_map(categories) if semantic else None
        self.panoptic = PanopticEvaluator(categories) if panoptic else None
        self.instance = InstanceEvaluator(instance_ground_truth) if instance_ground_truth else None
        self._instance_categories = ({c["id"] for c in instance_ground_truth["categories"]}
                                     if instance_ground_truth else set())
        self.num_images = 0

    @property
    def metric_groups(self) -> List[str]:
        return [name for name in ("semantic", "panoptic", "instance") if getattr(self, name) is not None]

    def reset(self) -> None:
        """Forget everything (e.g. before the next validation epoch)."""
        for evaluator in (self.semantic, self.panoptic, self.instance):
            if evaluator is not None:
                evaluator.reset()
        self.num_images = 0

    @torch.no_grad()
    def process(self, outputs: Mapping[str, torch.Tensor], metas: Sequence[Mapping[str, Any]],
                ground_truths: Optional[Sequence[Optional[GroundTruth]]] = None) -> List[ImagePrediction]:
        """Score one batch. ``outputs``: raw pred_logits/pred_masks or a runner's named tensors; ``metas``:
        one dict per image (image_id, file_name, orig_size, image_size, padded_size); ``ground_truths``:
        optional, loaded from the dataset when absent. Returns the batch's predictions."""
        if self.host is None:
            raise ValueError("this Evaluator scores finished predictions only (built without a host stage)")
        predictions = self.host(outputs, metas)
        for position, prediction in enumerate(predictions):
            self.update(prediction, ground_truths[position] if ground_truths else None)
        return predictions

    def update(self, prediction: ImagePrediction, ground_truth: Optional[GroundTruth] = None) -> None:
        """Score one image's finished prediction (parts of unused metric groups may be None)."""
        gt = ground_truth if ground_truth is not None else self._ground_truth(prediction.image_id)
        where = f"image {prediction.image_id} ({prediction.file_name})"
        if self.semantic is not None:
            _require(prediction.sem_seg, "a semantic map", where)
            _same_size(prediction.sem_seg.shape, gt, where)
            self.semantic.update(pred=prediction.sem_seg, gt=gt.sem_seg)
        if self.panoptic is not None:
            _require(prediction.panoptic_seg, "a panoptic segmentation", where)
            _same_size(prediction.panoptic_seg.shape, gt, where)
            self.panoptic.update(pred_seg=prediction.panoptic_seg, pred_segments=prediction.segments_info,
                                 gt_seg=gt.panoptic_seg, gt_segments=gt.segments_info)
        if self.instance is not None:
            _require(prediction.instances, "instance detections", where)
            self.instance.update(image_id=prediction.image_id,
                                 detections=[d for d in prediction.instances
                                             if d["category_id"] in self._instance_categories])
        self.num_images += 1

    def merge(self, other: "Evaluator") -> None:
        """Add another evaluator's counts on the same data (e.g. another rank's)."""
        if other.metric_groups != self.metric_groups:
            raise ValueError(f"merge: the other evaluator scores {other.metric_groups}, this one {self.metric_groups}")
        for name in self.metric_groups:
            getattr(self, name).merge(getattr(other, name))
        self.num_images += other.num_images

    def compute(self) -> Dict[str, Any]:
        """{"num_images", the summary numbers of each metric group (percent; nan where undefined),
        "per_class": {"semantic": {name: {iou, acc}}, "panoptic": {name: {PQ, SQ, RQ, TP, FP, FN, isthing}},
        "instance": {name: {AP}}}} for the groups that apply."""
        if self.num_images == 0:
            raise ValueError("no image was evaluated: the dataset or the loader gave no images")
        metrics: Dict[str, Any] = {"num_images": self.num_images}
        per_class: Dict[str, Any] = {}
        for name in self.metric_groups:
            result = getattr(self, name).compute()
            per_class[name] = result.pop("per_class")
            metrics.update(result)
        metrics["per_class"] = per_class
        return metrics


def _require(value: Any, what: str, where: str) -> None:
    if value is None:
        raise ValueError(f"{where}: the prediction holds no {what}, which this evaluation scores")


def _same_size(shape: Sequence[int], gt: GroundTruth, where: str) -> None:
    if tuple(shape) != (gt.height, gt.width):
        raise ValueError(f"{where}: prediction is {shape[1]}x{shape[0]} but the image is {gt.width}x{gt.height}; "
                         "predictions must be at the original resolution")


def build_evaluator(cfg: Any, dataset: SegmentationDataset) -> Evaluator:
    """The evaluator of ``cfg.model`` (mode, thresholds, top-k) on ``dataset`` (its label map and ground
    truth). Build it once and :meth:`Evaluator.reset` it between validation rounds: collecting the instance
    ground truth reads every annotation once."""
    model_cfg = cfg.model
    label_map = dataset.label_map
    panoptic = model_cfg.mode == "panoptic" and has_panoptic_ground_truth(dataset)
    wants_ap = model_cfg.mode in ("instance", "panoptic") and bool(label_map.thing_classes)
    return Evaluator(label_map=label_map, ground_truth=dataset.load_ground_truth,
                     host=HostStage.from_config(model_cfg, label_map), semantic=True, panoptic=panoptic,
                     instance_ground_truth=dataset.coco_instance_ground_truth() if wants_ap else None)


def run_batch(runner: Callable[[torch.Tensor], Dict[str, torch.Tensor]], images: torch.Tensor,
              max_batch_size: Optional[int]) -> Dict[str, torch.Tensor]:
    """The runner's outputs for ``images``, called on slices of at most ``max_batch_size``."""
    parts = [runner(chunk) for chunk in batch_chunks(images, max_batch_size)]
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts], dim=0) for name in parts[0]}


def evaluate_runner(*, runner: Any, dataset: SegmentationDataset, evaluator: Evaluator, dataset_cfg: Any,
                    batch_size: int, num_workers: int, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Run ``runner`` over every image of ``dataset`` (inputs prepared for its fixed size, if any), stream
    the outputs into ``evaluator`` and return :meth:`Evaluator.compute`. ``progress(done, total)`` is called
    after each batch."""
    images = GroundTruthImages(dataset, transform=input_transform(dataset_cfg=dataset_cfg,
                                                                  fixed_input_size=runner.fixed_input_size))
    loader = build_loader(images, batch_size=batch_size, num_workers=num_workers,
                          size_divisibility=dataset_cfg.augmentation.size_divisibility,
                          fixed_input_size=runner.fixed_input_size)
    done = 0
    for batch in loader:
        outputs = run_batch(runner, batch["images"], runner.max_batch_size)
        evaluator.process(outputs, batch["metas"], batch.get("ground_truths"))
        done += len(batch["metas"])
        if progress is not None:
            progress(done, len(images))
    return evaluator.compute()

