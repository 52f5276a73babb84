"""What the quantize report compares between the fp32 parent and the quantized model: latency on the same
inputs, accuracy on dataset.val through the evaluate pipeline, and the drop."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

ACCURACY_KEYS = ("mIoU", "pixel_accuracy", "PQ", "SQ", "RQ", "AP")


def _timed_ms_per_image(runner: Callable[[torch.Tensor], Any], images: torch.Tensor) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = runner(images)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    del outputs
    return (time.perf_counter() - started) * 1000.0 / images.shape[0]


def compare_latency(reference: Callable[[torch.Tensor], Any], candidate: Callable[[torch.Tensor], Any],
                    inputs: Sequence[torch.Tensor], *, warmup: int = 1) -> Dict[str, float]:
    """Median milliseconds per image of both runners on the same ``inputs`` (batches), after ``warmup``
    untimed calls each. The two are timed alternately, batch by batch, so a busy machine slows both alike."""
    if not inputs:
        raise ValueError("compare_latency needs at least one input batch")
    times: Dict[str, list] = {"fp32_ms": [], "quantized_ms": []}
    with torch.inference_mode():
        for images in list(inputs)[:warmup]:
            reference(images)
            candidate(images)
        for images in inputs:
            times["fp32_ms"].append(_timed_ms_per_image(reference, images))
            times["quantized_ms"].append(_timed_ms_per_image(candidate, images))
    return {key: float(statistics.median(values)) for key, values in times.items()}


def _finite(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def accuracy_summary(metrics: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The headline numbers of an evaluation (percent; None where undefined or not computed)."""
    return {key: _finite(metrics.get(key)) for key in ACCURACY_KEYS if key in metrics}


def accuracy_drop(reference: Dict[str, Optional[float]], quantized: Dict[str, Optional[float]]) -> Dict[str, float]:
    """reference - quantized, in points, for every number both have."""
    return {key: reference[key] - quantized[key] for key in reference
            if reference.get(key) is not None and quantized.get(key) is not None}


def evaluate_on_val(runner: Any, *, config: Any, dataset: Any, progress: Optional[Callable] = None) -> Dict[str, Any]:
    """Score ``runner`` on ``dataset`` with the evaluate action's pipeline (same host stage and metrics)."""
    from ..evaluation.pipeline import build_evaluator, evaluate_runner

    evaluator = build_evaluator(config, dataset)
    return evaluate_runner(runner=runner, dataset=dataset, evaluator=evaluator, dataset_cfg=config.dataset,
                           batch_size=config.dataset.val.batch_size, num_workers=config.dataset.val.num_workers,
                           progress=progress)
