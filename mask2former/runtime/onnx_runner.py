"""Run an exported ONNX model with onnxruntime (runner kind ``onnx``).

The graph's input is ``inputs`` [B, 3, H, W]; H x W is fixed at export, so ``fixed_input_size`` is
(H, W) and callers resize and pad to it. A dynamic batch axis gives ``max_batch_size`` None; a fixed
batch N gives N, and smaller batches are zero-padded to N inside and cut back afterwards.

The mode and class count come from the file's mask2former metadata (written by export), else from
its output names and the ``sem_scores`` shape.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import ActionError
from ..checkpoint import CheckpointError, read_model_bytes
from ..export.metadata import ModelRecord
from .inference_model import MODES, output_names

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
INTEGER_OUTPUTS = ("pan_classes", "inst_classes")


def providers_for(device: Union[str, torch.device], available: Sequence[str]) -> List[str]:
    """onnxruntime execution providers for ``device``: CUDA first when asked for and installed."""
    device = torch.device(device)
    if device.type == "cuda":
        if CUDA_PROVIDER in available:
            return [CUDA_PROVIDER, CPU_PROVIDER]
        log.warning("device %s asked for, but this onnxruntime has no %s (install onnxruntime-gpu); running on "
                    "the CPU", device, CUDA_PROVIDER)
    return [CPU_PROVIDER]


def mode_of_outputs(names: Sequence[str]) -> str:
    """The mode whose output names (in any order) are exactly ``names``."""
    for mode in MODES:
        if set(output_names(mode)) == set(names):
            return mode
    raise ValueError(f"the ONNX outputs {list(names)} are not those of any mode "
                     f"({', '.join(f'{m}: {list(output_names(m))}' for m in MODES)}); was it exported by this tool?")


def _dim(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) and value > 0 else None


class OnnxRunner:
    """An onnxruntime session behind the runner call form (see mask2former.runtime)."""

    def __init__(self, path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                 session_options: Any = None, encryption_key: Optional[str] = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.providers = providers_for(device, ort.get_available_providers())
        try:
            model = read_model_bytes(self.path, encryption_key)  # decrypted in memory when encrypted
        except CheckpointError as exc:
            raise ActionError(str(exc)) from None
        try:
            self.session = ort.InferenceSession(model, sess_options=session_options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise ActionError(f"onnxruntime cannot load '{self.path}': {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ActionError(f"'{self.path}' must have one 4-D image input [B, 3, H, W]; it has "
                              f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        batch, channels, height, width = inputs[0].shape
        if _dim(height) is None or _dim(width) is None:
            raise ActionError(f"'{self.path}' has no fixed input height and width ({inputs[0].shape}); export it "
                              "with export.input_height and export.input_width")
        self.input_channels = _dim(channels) or 3
        self.fixed_input_size: Optional[Tuple[int, int]] = (int(height), int(width))
        self.max_batch_size: Optional[int] = _dim(batch)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.record = ModelRecord.from_props(dict(self.session.get_modelmeta().custom_metadata_map))
        try:
            self.mode = self.record.mode if self.record else mode_of_outputs(self.output_names)
            if set(self.output_names) != set(output_names(self.mode)):
                raise ValueError(f"outputs {self.output_names} do not match mode {self.mode}")
        except ValueError as exc:
            raise ActionError(f"'{self.path}': {exc}") from exc
        sem_classes = self.session.get_outputs()[self.output_names.index("sem_scores")].shape[1]
        self.num_classes = self.record.num_classes if self.record else int(sem_classes)

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.input_channels:
            raise ValueError(f"OnnxRunner expects images [B, {self.input_channels}, H, W]; got "
                             f"{tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.fixed_input_size:
            raise ValueError(f"'{self.path.name}' was exported for {self.fixed_input_size[0]}x"
                             f"{self.fixed_input_size[1]} inputs (height x width); got "
                             f"{images.shape[-2]}x{images.shape[-1]}: resize and pad to the runner's "
                             "fixed_input_size")
        count = images.shape[0]
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.max_batch_size is not None:
            if count > self.max_batch_size:
                raise ValueError(f"'{self.path.name}' takes at most {self.max_batch_size} images per call; got {count}")
            if count < self.max_batch_size:
                pad = np.zeros((self.max_batch_size - count,) + array.shape[1:], dtype=np.float32)
                array = np.concatenate([array, pad], axis=0)
        values = self.session.run(self.output_names, {self.input_name: array})
        outputs = {}
        for name, value in zip(self.output_names, values):
            tensor = torch.from_numpy(np.ascontiguousarray(value[:count]))
            outputs[name] = tensor.long() if name in INTEGER_OUTPUTS else tensor.float()
        return {name: outputs[name] for name in output_names(self.mode)}


def load(path: Union[str, Path], config: Any, device: torch.device) -> OnnxRunner:
    """Runner loader of kind 'onnx' (see mask2former.runtime.load_runner)."""
    runner = OnnxRunner(path, device=device, encryption_key=getattr(config, "encryption_key", None))
    wanted = getattr(getattr(config, "model", None), "mode", None)
    if wanted is not None and wanted != runner.mode:
        log.warning("'%s' was exported in %s mode but model.mode is %s; its outputs follow %s", path, runner.mode,
                    wanted, runner.mode)
    return runner
