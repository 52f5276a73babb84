"""The quantized model file ``quantized_model_<backend>.pth`` and its loader.

It is a checkpoint of this tool (mask2former.checkpoint) whose ``state_dict`` is the QUANTIZED model's,
plus a ``quantization`` record::

    {"backend": "torchao" | "modelopt.pytorch", "mode", "algorithm", "layers": [...], "skip_names": [...],
     "modules": {module name: {"weights": dtype, "activations": dtype | None}}, "versions": {...}}

and, for modelopt.pytorch, ``modelopt_state`` (ModelOpt's record of the inserted quantizers).

Loading rebuilds the fp32 network from ``model_config``, re-applies the same quantization to the same
modules (torchao: ``quantize_`` with the recorded module list; ModelOpt: ``restore_from_modelopt_state``),
then loads the quantized state_dict, so no pickled code is needed (``torch.load(weights_only=True)``).

With an ``encryption_key`` the file is written encrypted (streamed, no plaintext on disk) and read back by
decrypting it in memory (mask2former.checkpoint).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..checkpoint import checkpoint_source, model_config_from, read_checkpoint, save_checkpoint
from ..config.model import ModelConfig
from .dependencies import require_backend
from .selection import ModuleChoice

PTH_BACKENDS = ("torchao", "modelopt.pytorch")


@dataclass
class QuantizationRecord:
    backend: str
    mode: str
    algorithm: str
    layers: List[Dict[str, str]]
    skip_names: List[str]
    modules: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)

    @property
    def choices(self) -> Dict[str, ModuleChoice]:
        return {name: ModuleChoice(**value) for name, value in self.modules.items()}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantizationRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def modules_dict(chosen: Dict[str, ModuleChoice]) -> Dict[str, Dict[str, Optional[str]]]:
    return {name: dataclasses.asdict(choice) for name, choice in chosen.items()}


def save_quantized(path: Union[str, Path], *, model: nn.Module, parent: Dict[str, Any],
                   record: QuantizationRecord, modelopt_state: Optional[Dict[str, Any]] = None,
                   encryption_key: Optional[str] = None) -> None:
    """Write the quantized model, keeping the parent checkpoint's model_config, label map and counters;
    encrypted when ``encryption_key`` is given."""
    payload = {key: parent.get(key) for key in ("model_config", "label_map", "contiguous_id", "epoch",
                                                 "global_step")}
    payload["state_dict"] = model.state_dict()
    payload["quantization"] = record.to_dict()
    if modelopt_state is not None:
        payload["modelopt_state"] = modelopt_state
    save_checkpoint(path, payload, encryption_key=encryption_key)


def is_quantized_checkpoint(payload: Dict[str, Any]) -> bool:
    return isinstance(payload.get("quantization"), dict)


def rebuild_quantized(payload: Dict[str, Any], model_cfg: Optional[ModelConfig] = None,
                      ) -> Tuple[nn.Module, ModelConfig, QuantizationRecord]:
    """(model in eval mode, its ModelConfig, the record) from a quantized checkpoint's payload."""
    from ..model import build_model

    if not is_quantized_checkpoint(payload):
        raise ValueError("the checkpoint holds no 'quantization' record; it is not a quantized model of this tool")
    record = QuantizationRecord.from_dict(payload["quantization"])
    if record.backend not in PTH_BACKENDS:
        raise ValueError(f"quantization backend {record.backend!r} has no .pth form (expected one of "
                         f"{list(PTH_BACKENDS)})")
    module = require_backend(record.backend)
    config = model_config_from(payload, model_cfg)
    config.backbone.pretrained_weights = None
    model = build_model(config).eval()
    if record.backend == "torchao":
        from .torchao_backend import apply_torchao

        apply_torchao(model, record.modules, torchao_quantization=module)
        model.load_state_dict(payload["state_dict"], strict=True, assign=True)
    else:
        from .modelopt_torch import restore_modelopt

        model = restore_modelopt(model, payload["modelopt_state"])
        model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), config, record


def read_quantized(path: Union[str, Path], encryption_key: Optional[str] = None) -> Dict[str, Any]:
    """The payload of a quantized checkpoint. A backend's quantized tensor types become loadable with
    ``torch.load(weights_only=True)`` once the backend is imported, so the backends whose types the file
    refers to are imported first (and only those: importing ModelOpt takes seconds). An encrypted file is
    decrypted in memory for that look and again by read_checkpoint (a missing or wrong key: CheckpointError)."""
    try:
        source = checkpoint_source(path, encryption_key)
        referenced = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # noqa: BLE001 - unreadable files and wrong keys get read_checkpoint's sentence below
        referenced = []
    for prefix, backend in (("torchao.", "torchao"), ("modelopt.", "modelopt.pytorch")):
        if any(name.startswith(prefix) for name in referenced):
            require_backend(backend)
    return read_checkpoint(path, encryption_key=encryption_key)


def load_quantized(path: Union[str, Path], model_cfg: Optional[ModelConfig] = None,
                   encryption_key: Optional[str] = None) -> Tuple[nn.Module, ModelConfig, QuantizationRecord]:
    """Rebuild the quantized model saved at ``path`` (see the module docstring); ``encryption_key`` opens an
    encrypted file."""
    return rebuild_quantized(read_quantized(path, encryption_key=encryption_key), model_cfg)


def state_dict_bytes(state_dict: Dict[str, Any]) -> int:
    """Serialized size of a state dict (what a checkpoint file spends on the weights)."""
    import io

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()
