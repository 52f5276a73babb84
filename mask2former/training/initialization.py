"""Where the weights of a training run start: official Swin or EfficientViT weights for the backbone, a pretrained
Mask2Former checkpoint, and frozen parameters.

File arguments here are LOCAL paths; remote URIs are fetched before (see mask2former.actions.train).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

from torch import nn

from ..checkpoint import CheckpointError, read_checkpoint
from ..model.weights import CLASS_HEAD_KEYS, ImportReport, import_weights, load_renamed
from .errors import TrainingSetupError

log = logging.getLogger(__name__)


def load_backbone_weights(model: nn.Module, path: Path, format: str = "swin") -> ImportReport:
    """Official classification weights (``model.backbone.pretrained_weights``) into the backbone; ``format`` is
    the backbone family ('swin': official Swin .pth; 'efficientvit': MIT .pt or timm naming)."""
    family = "Swin" if format == "swin" else "EfficientViT"
    try:
        report = import_weights(model, path, format)
    except (OSError, ValueError, KeyError) as error:
        raise TrainingSetupError(f"model.backbone.pretrained_weights '{path}' cannot be read as an official {family} "
                                 f"checkpoint: {error}") from None
    if not report.loaded:
        expected = ("an official Swin .pth with its weights under 'model'" if format == "swin" else
                    "an EfficientViT .pt of the MIT release (backbone.* under 'state_dict') or timm's weights "
                    "of the same variant")
        raise TrainingSetupError(f"model.backbone.pretrained_weights '{path}': no tensor fits the {family} backbone "
                                 f"({len(report.unexpected)} unexpected keys, e.g. {report.unexpected[:3]}); "
                                 f"expected {expected}.")
    if report.missing:
        log.warning("%s weights %s do not cover %d backbone tensors (kept initialised): %s", family, path,
                    len(report.missing), ", ".join(report.missing[:8]))
    log.info("Loaded %d backbone tensors from %s", len(report.loaded), path)
    return report


def load_pretrained_model(model: nn.Module, path: Path, encryption_key: Optional[str] = None, *,
                          contiguous_id: bool = False) -> ImportReport:
    """Weights of a checkpoint of this tool (or one written by ``import-weights``) into ``model``.

    The class head is skipped, with a log line, when its number of classes differs (fine-tuning to another
    label set); any other difference of architecture is an error naming the keys. A TAO checkpoint's class head
    is laid out for ``contiguous_id`` (the spec's dataset.contiguous_id).
    """
    try:
        payload = read_checkpoint(path, encryption_key=encryption_key, tao_contiguous_id=contiguous_id)
    except CheckpointError as error:
        raise TrainingSetupError(f"train.pretrained_model_path: {error}") from None
    report = ImportReport(source=str(path), format="checkpoint")
    load_renamed(model, payload["state_dict"], report)
    head_skipped = {key: reason for key, reason in report.skipped.items() if key in CLASS_HEAD_KEYS}
    other_skipped = {key: reason for key, reason in report.skipped.items() if key not in CLASS_HEAD_KEYS}
    problems = []
    if report.missing:
        problems.append(f"{len(report.missing)} tensor(s) of the model are absent, e.g. {report.missing[:3]}")
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} tensor(s) are unknown to the model, e.g. {report.unexpected[:3]}")
    if other_skipped:
        key, reason = next(iter(other_skipped.items()))
        problems.append(f"{len(other_skipped)} tensor(s) differ in shape, e.g. {key}: {reason}")
    if problems:
        raise TrainingSetupError(f"train.pretrained_model_path '{path}' does not match the model of the spec: "
                                 + "; ".join(problems) + ". Set the model section to the checkpoint's architecture.")
    if head_skipped:
        log.info("Pretrained model %s: class head dropped (%s); it trains from scratch.", path,
                 next(iter(head_skipped.values())))
    log.info("Loaded %d tensors from pretrained model %s", len(report.loaded), path)
    return report


def _under(name: str, prefix: str) -> bool:
    """True when parameter ``name`` lies under the dotted ``prefix`` ('backbone' covers 'backbone.x', not
    'backbone2.x')."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Set requires_grad False on the parameters under any of the dotted name prefixes; returns their names.

    A prefix that matches no parameter is an error naming it (a typo would otherwise train everything).
    """
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            top = sorted({name.split(".", 1)[0] for name in names})
            raise TrainingSetupError(f"train.freeze: the prefix {prefix!r} matches no parameter of the model; "
                                     f"parameter names start with {top} (e.g. 'backbone', 'backbone.layers.0', "
                                     "'pixel_decoder').")
    frozen = []
    for name, param in model.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    if frozen:
        log.info("Froze %d parameter tensors under %s", len(frozen), list(prefixes))
    return frozen
