"""Run a PyTorch checkpoint: the model rebuilt from its recorded architecture, wrapped in InferenceModel.

An encrypted checkpoint is decrypted in memory with the spec's ``encryption_key`` (never on disk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..checkpoint import CheckpointError, build_model_from_checkpoint
from ..config.model import ModelConfig
from ..errors import ActionError
from .inference_model import InferenceModel

#: bf16 inference runs the pixel decoder in bf16 too (see BENCHMARKS.md for the accuracy this costs).
PIXEL_DECODER_BF16 = True


class TorchRunner:
    """Any input size and batch size; outputs stay on ``device``."""

    fixed_input_size = None
    max_batch_size = None
    precision = "fp32"

    def __init__(self, model: nn.Module, *, model_cfg: ModelConfig, device: Union[str, torch.device]) -> None:
        self.device = torch.device(device)
        self.mode = model_cfg.mode
        self.num_classes = int(model_cfg.sem_seg_head.num_classes)
        self.model = InferenceModel(model, mode=model_cfg.mode, topk=model_cfg.test_topk_per_image)
        self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path, Dict[str, Any]], *, model_cfg: Optional[ModelConfig],
                        device: Union[str, torch.device], encryption_key: Optional[str] = None,
                        tao_contiguous_id: bool = False) -> "TorchRunner":
        """The checkpoint's architecture; mode, thresholds and top-k from ``model_cfg`` when given.
        ``encryption_key`` opens an encrypted checkpoint; ``tao_contiguous_id``: see read_checkpoint."""
        try:
            model, config = build_model_from_checkpoint(path, model_cfg, encryption_key=encryption_key,
                                                        tao_contiguous_id=tao_contiguous_id)
        except CheckpointError as exc:
            raise ActionError(str(exc)) from exc
        return cls(model, model_cfg=config, device=device)

    def set_precision(self, precision: str, *, pixel_decoder_bf16: bool = PIXEL_DECODER_BF16) -> None:
        """Run in ``precision`` ("fp32" or "bf16" autocast; the caller has chosen it for the hardware).
        ``pixel_decoder_bf16``: let autocast reach the deformable-attention pixel decoder too."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"TorchRunner precision must be fp32 or bf16; got {precision!r}")
        self.precision = precision
        for module in self.model.modules():
            if hasattr(module, "fp32_under_autocast"):
                module.fp32_under_autocast = not (precision == "bf16" and pixel_decoder_bf16)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TorchRunner expects images [B, 3, H, W]; got {tuple(images.shape)}")
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            outputs = self.model(images.to(self.device, dtype=torch.float32))
        return {name: value.float() if value.is_floating_point() else value for name, value in outputs.items()}


def load(path: Union[str, Path], config: Any, device: torch.device) -> TorchRunner:
    """Runner loader of kind 'checkpoint' (see mask2former.runtime.load_runner)."""
    dataset = getattr(config, "dataset", None)
    return TorchRunner.from_checkpoint(path, model_cfg=config.model, device=device,
                                       encryption_key=getattr(config, "encryption_key", None),
                                       tao_contiguous_id=bool(getattr(dataset, "contiguous_id", False)))
