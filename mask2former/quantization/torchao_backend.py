"""torchao int8 weight-only quantization of chosen Linear layers (CPU and GPU)."""

from __future__ import annotations

from typing import Any, Collection

from torch import nn

LAYER_TYPES = (nn.Linear,)  # Int8WeightOnlyConfig quantizes Linear weights only


def apply_torchao(model: nn.Module, modules: Collection[str], *, torchao_quantization: Any) -> nn.Module:
    """Quantize the Linear layers named in ``modules`` in place (int8 weights, per-channel scales).

    ``torchao_quantization`` is the ``torchao.quantization`` module. The same call on a freshly built
    fp32 model re-creates the quantized parameter layout, which is how a saved model is loaded.
    """
    names = set(modules)
    unknown = names - {name for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    if unknown:
        raise ValueError(f"torchao int8 weight-only quantizes Linear layers only; not Linear layers of this "
                         f"network: {sorted(unknown)[:5]}")
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig(),
                                   filter_fn=lambda module, fqn: fqn in names and isinstance(module, LAYER_TYPES))
    return model
