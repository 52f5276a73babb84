"""Proof that a converted model (ONNX Runtime, TensorRT, ...) computes what the reference computes.

Both run on the same inputs; every named output is compared and its largest absolute difference
recorded. Gated outputs (floating-point scores, probabilities and mask logits) must stay within the
tolerance; integer outputs (class indices) must agree wherever no near tie explains a difference.

Top-k outputs (``inst_*``) select (query, class) pairs by class probability, so two entries whose
probabilities differ by less than the numerical noise can swap places between runtimes. Such a swap
is not a difference in what the model computes: a position whose values differ is accepted when an
entry within ``TOPK_SWAP_WINDOW`` places in the other run has the same class and matches within the
tolerance. Each accepted swap is counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

TOPK_OUTPUTS = ("inst_scores", "inst_classes", "inst_mask_logits")
TOPK_SWAP_WINDOW = 3
Outputs = Mapping[str, torch.Tensor]


def sample_inputs(*, batch: int, channels: int, height: int, width: int, count: int, seed: int) -> List[torch.Tensor]:
    """``count`` float32 batches [batch, channels, height, width] that look like normalised photos.

    Smooth random colour fields (random 8x8 maps upsampled) plus fine noise, about zero mean and unit
    variance per channel, so the network sees regions and edges rather than white noise. Same seed,
    same tensors.
    """
    generator = torch.Generator().manual_seed(int(seed))
    batches = []
    for _ in range(count):
        coarse = torch.randn(batch, channels, 8, 8, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        fine = 0.25 * torch.randn(batch, channels, height, width, generator=generator)
        batches.append((smooth + fine).float().contiguous())
    return batches


@dataclass
class OutputDifference:
    """One output's comparison. Float outputs: the largest absolute difference (gated ones must stay within
    the tolerance). Integer outputs (class indices): ``mismatches`` counts every differing entry,
    ``unexplained`` those not explained by a near tie (see :func:`compare_outputs`); it must be 0."""

    name: str
    shape: List[int]
    dtype: str
    gated: bool
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    mismatches: int = 0
    unexplained: int = 0
    swapped_entries: int = 0

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith("int") or self.dtype.startswith("uint") or self.dtype == "bool"

    def passes(self, tolerance: float) -> bool:
        if self.is_integer:
            return self.unexplained == 0
        return not self.gated or self.max_abs_diff <= tolerance

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"shape": self.shape, "dtype": self.dtype, "gated": self.gated or self.is_integer}
        if self.is_integer:
            out.update(mismatches=self.mismatches, unexplained_mismatches=self.unexplained)
        else:
            out.update(max_abs_diff=self.max_abs_diff, mean_abs_diff=self.mean_abs_diff)
        if self.name in TOPK_OUTPUTS:
            out["swapped_entries"] = self.swapped_entries
        return out


@dataclass
class ParityResult:
    tolerance: float
    gated: List[str]
    outputs: Dict[str, OutputDifference] = field(default_factory=dict)
    num_samples: int = 0

    @property
    def failures(self) -> List[OutputDifference]:
        return [d for d in self.outputs.values() if not d.passes(self.tolerance)]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> Optional[OutputDifference]:
        """The gated float output with the largest difference."""
        floats = [d for d in self.outputs.values() if d.gated and not d.is_integer]
        return max(floats, key=lambda d: d.max_abs_diff) if floats else None

    @property
    def max_abs_diff(self) -> float:
        worst = self.worst
        return worst.max_abs_diff if worst is not None else 0.0

    def describe_failure(self) -> str:
        parts = []
        for diff in self.failures:
            if diff.is_integer:
                parts.append(f"output '{diff.name}' has {diff.unexplained} differing class indices")
            else:
                parts.append(f"output '{diff.name}' differs by up to {diff.max_abs_diff:.3g} "
                             f"(tolerance {self.tolerance:g})")
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "max_abs_diff": self.max_abs_diff,
                "worst_output": self.worst.name if self.worst else None, "num_samples": self.num_samples,
                "failures": [d.name for d in self.failures],
                "outputs": {name: diff.to_dict() for name, diff in self.outputs.items()}}


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


def _abs_diff(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    return (reference.double() - candidate.double()).abs()


def _align_topk(reference: Outputs, candidate: Outputs, tolerance: float) -> Dict[str, Any]:
    """Per-position differences of the inst_* group with near-tie swaps resolved (see module docstring).

    Returns {"scores": [B, k] diffs, "masks": [B, k] max diffs, "classes": [B, k] bool mismatch left,
    "swapped": count}.
    """
    ref_scores, cand_scores = reference["inst_scores"], candidate["inst_scores"]
    ref_classes, cand_classes = reference["inst_classes"].long(), candidate["inst_classes"].long()
    ref_masks, cand_masks = reference["inst_mask_logits"], candidate["inst_mask_logits"]
    score_diff = _abs_diff(ref_scores, cand_scores)
    mask_diff = _abs_diff(ref_masks, cand_masks).flatten(2).max(-1).values
    class_mismatch = ref_classes != cand_classes
    swapped = 0
    k = score_diff.shape[1]
    bad = (score_diff > tolerance) | (mask_diff > tolerance) | class_mismatch
    for b, p in bad.nonzero().tolist():
        best = None
        for q in range(max(0, p - TOPK_SWAP_WINDOW), min(k, p + TOPK_SWAP_WINDOW + 1)):
            if q == p or int(cand_classes[b, q]) != int(ref_classes[b, p]):
                continue
            s = float(_abs_diff(ref_scores[b, p], cand_scores[b, q]))
            m = float(_abs_diff(ref_masks[b, p], cand_masks[b, q]).max())
            if s <= tolerance and m <= tolerance and (best is None or max(s, m) < best[0]):
                best = (max(s, m), s, m)
        if best is not None:
            score_diff[b, p], mask_diff[b, p], class_mismatch[b, p] = best[1], best[2], False
            swapped += 1
    return {"scores": score_diff, "masks": mask_diff, "classes": class_mismatch, "swapped": swapped}


def _unexplained_panoptic_classes(reference: Outputs, mismatch: torch.Tensor, tolerance: float) -> int:
    """pan_classes is the argmax over K+1 class probabilities: two classes can only tie when the winner's
    probability is at most 0.5, so a differing class where the reference winner has more than 0.5 +
    tolerance is a real difference."""
    if "pan_scores" not in reference:
        return int(mismatch.sum())
    return int((mismatch & (reference["pan_scores"] > 0.5 + tolerance)).sum())


def compare_outputs(reference: Outputs, candidate: Outputs, *, gated: Sequence[str],
                    tolerance: float) -> Dict[str, OutputDifference]:
    """Differences of one batch, per output name of ``reference`` (which ``candidate`` must all have).

    ``gated``: the float outputs that must stay within ``tolerance``; integer outputs are always checked
    (differences not explained by a near tie fail).
    """
    missing = [name for name in reference if name not in candidate]
    if missing:
        raise ValueError(f"the converted model lacks the outputs {missing}; it returns {sorted(candidate)}")
    differences: Dict[str, OutputDifference] = {}
    aligned = _align_topk(reference, candidate, tolerance) if all(n in reference for n in TOPK_OUTPUTS) else None
    for name, ref in reference.items():
        cand = candidate[name].to(ref.device)
        if tuple(cand.shape) != tuple(ref.shape):
            raise ValueError(f"output '{name}' has shape {tuple(cand.shape)} in the converted model and "
                             f"{tuple(ref.shape)} in the reference")
        diff = OutputDifference(name=name, shape=list(ref.shape), dtype=str(ref.dtype).replace("torch.", ""),
                                gated=name in gated)
        if diff.is_integer:
            mismatch = ref.long() != cand.long()
            diff.mismatches = int(mismatch.sum())
            if aligned is not None and name == "inst_classes":
                diff.unexplained = int(aligned["classes"].sum())
            elif name == "pan_classes":
                diff.unexplained = _unexplained_panoptic_classes(reference, mismatch, tolerance)
            else:
                diff.unexplained = diff.mismatches
        else:
            if aligned is not None and name in ("inst_scores", "inst_mask_logits"):
                values = aligned["scores"] if name == "inst_scores" else aligned["masks"]
            else:
                values = _abs_diff(ref, cand)
            diff.max_abs_diff = float(values.max()) if values.numel() else 0.0
            diff.mean_abs_diff = float(values.mean()) if values.numel() else 0.0
        if aligned is not None and name in TOPK_OUTPUTS:
            diff.swapped_entries = aligned["swapped"]
        differences[name] = diff
    return differences


def float_outputs(outputs: Outputs) -> List[str]:
    """The names of the floating-point outputs (the ones a parity check gates by default)."""
    return [name for name, tensor in outputs.items() if _is_float(tensor)]


def check_parity(reference: Callable[[torch.Tensor], Outputs], candidate: Callable[[torch.Tensor], Outputs],
                 inputs: Sequence[torch.Tensor], *, tolerance: float,
                 gated: Optional[Sequence[str]] = None) -> ParityResult:
    """Run both on every input batch; per output, the worst difference over all batches.

    ``gated``: the outputs that must stay within ``tolerance`` (default: every floating-point output).
    """
    if tolerance <= 0:
        raise ValueError(f"parity tolerance must be > 0; got {tolerance}")
    result: Optional[ParityResult] = None
    for images in inputs:
        with torch.no_grad():
            ref = {k: v.detach().cpu() for k, v in reference(images).items()}
            cand = {k: v.detach().cpu() for k, v in candidate(images).items()}
        names = list(gated) if gated is not None else float_outputs(ref)
        if result is None:
            result = ParityResult(tolerance=float(tolerance), gated=names)
        for name, diff in compare_outputs(ref, cand, gated=names, tolerance=tolerance).items():
            seen = result.outputs.get(name)
            if seen is None:
                result.outputs[name] = diff
                continue
            seen.mean_abs_diff = (seen.mean_abs_diff * result.num_samples + diff.mean_abs_diff) / (result.num_samples + 1)
            seen.max_abs_diff = max(seen.max_abs_diff, diff.max_abs_diff)
            seen.mismatches += diff.mismatches
            seen.unexplained += diff.unexplained
            seen.swapped_entries += diff.swapped_entries
        result.num_samples += 1
    if result is None:
        raise ValueError("check_parity needs at least one input batch")
    return result
