"""The precision an evaluate or inference job runs its model in: ``fp32`` or ``bf16`` (autocast).

bf16 pays only on hardware with bf16 arithmetic: a CUDA device that supports it, or a CPU with AMX
(``amx_bf16``) or AVX-512-bf16 (``avx512_bf16``). Anywhere else PyTorch emulates bf16 and runs slower than
fp32, so a ``bf16`` request runs fp32 there and the log says why. Only PyTorch checkpoints run in bf16:
onnxruntime's CPU execution provider has no bf16 kernels for this graph, and quantized models and TensorRT
engines carry their own precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet

import torch

PRECISIONS = ("fp32", "bf16")
#: /proc/cpuinfo flags naming CPU bf16 units, best first, with the words the log uses for them.
CPU_BF16_FLAGS = (("amx_bf16", "AMX (amx_bf16)"), ("avx512_bf16", "AVX-512-bf16 (avx512_bf16)"))
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Precision:
    requested: str
    used: str
    reason: str  #: why ``used`` (the hardware found, or why bf16 was not used)

    def as_dict(self) -> Dict[str, str]:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def cpu_flags(cpuinfo: Path = _CPUINFO) -> FrozenSet[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_hardware(device: torch.device) -> str:
    """The bf16 units of ``device`` in words, or "" when it has none."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (bf16)" if torch.cuda.is_bf16_supported() else ""
    flags = cpu_flags()
    return next((words for flag, words in CPU_BF16_FLAGS if flag in flags), "")


def choose_precision(requested: str, *, kind: str, device: torch.device) -> Precision:
    """What a job asking for ``requested`` runs in, for a model of runner ``kind`` on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested == "fp32":
        return Precision(requested, "fp32", "requested")
    if kind == "onnx":
        return Precision(requested, "fp32", "onnxruntime's CPU execution provider has no bf16 kernels for this "
                                            "graph's convolutions and attention: the ONNX model runs in fp32")
    if kind != "checkpoint":
        return Precision(requested, "fp32", f"a {kind} model runs in the precision it was built with; bf16 "
                                            "autocast applies to PyTorch checkpoints")
    hardware = bf16_hardware(device)
    if not hardware:
        where = "this GPU has no bf16 support" if device.type == "cuda" else \
            "this CPU has neither AMX nor AVX-512-bf16, where bf16 is emulated and slower than fp32"
        return Precision(requested, "fp32", where)
    return Precision(requested, "bf16", f"bf16 autocast on {hardware}")
