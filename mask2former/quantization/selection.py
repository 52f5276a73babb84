"""Which modules a quantization backend touches, and with which data types.

Candidates are the network's ``nn.Linear`` and ``nn.Conv2d`` modules (torchao's int8 weight-only kernels
take Linear layers only). Rules, applied to each candidate's module name with fnmatch:

- ``quantize.skip_names``: a matching module stays in full precision, whatever else says;
- ``quantize.layers`` empty: every other candidate gets int8 weights (and int8 activations in
  static_ptq);
- ``quantize.layers`` given: only modules matching an entry are quantized, with that entry's data types
  (the last matching entry wins); ``native`` weights leave the module in full precision.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

DTYPES = ("int8", "fp8_e4m3fn", "fp8_e5m2", "native")
CANDIDATE_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerRule:
    module_name: str
    weights: str = "int8"
    activations: str = "int8"


@dataclass(frozen=True)
class ModuleChoice:
    """The data types one module is quantized with (activations None: weight-only)."""

    weights: str
    activations: Optional[str]


def rules_from_config(layers: Sequence[Any]) -> List[LayerRule]:
    """``quantize.layers`` entries (QuantizeLayer: module_name, weights.dtype, activations.dtype) as
    LayerRules, data types checked."""
    rules = []
    for index, layer in enumerate(layers):
        for what in ("weights", "activations"):
            dtype = getattr(layer, what).dtype
            if dtype not in DTYPES:
                raise ValueError(f"quantize.layers[{index}].{what}.dtype {dtype!r} is not one of {list(DTYPES)}")
        rules.append(LayerRule(module_name=str(layer.module_name), weights=layer.weights.dtype,
                               activations=layer.activations.dtype))
    return rules


def rules_from_dicts(entries: Sequence[Dict[str, str]]) -> List[LayerRule]:
    """LayerRules stored in a quantization record (see :func:`rules_to_dicts`)."""
    return [LayerRule(**entry) for entry in entries]


def candidate_modules(model: nn.Module, types: Tuple[type, ...] = CANDIDATE_TYPES) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def select_modules(model: nn.Module, *, layers: Sequence[LayerRule], skip_names: Sequence[str], static: bool,
                   types: Tuple[type, ...] = CANDIDATE_TYPES) -> Dict[str, ModuleChoice]:
    """Module name -> ModuleChoice for every module to quantize (see the module docstring)."""
    chosen: Dict[str, ModuleChoice] = {}
    for name in candidate_modules(model, types):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip_names):
            continue
        rule = LayerRule(module_name="*") if not layers else None
        for candidate in layers:
            if fnmatch.fnmatchcase(name, candidate.module_name):
                rule = candidate
        if rule is None or rule.weights == "native":
            continue
        activations = rule.activations if static and rule.activations != "native" else None
        chosen[name] = ModuleChoice(weights=rule.weights, activations=activations)
    return chosen


def check_patterns_match(model: nn.Module, *, layers: Sequence[LayerRule], skip_names: Sequence[str]) -> None:
    """Every pattern must name at least one module of the network (a pattern matching nothing is a typo)."""
    names = [name for name, _ in model.named_modules() if name]
    for key, patterns in (("quantize.layers[].module_name", [r.module_name for r in layers]),
                          ("quantize.skip_names", list(skip_names))):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"{key} pattern {pattern!r} matches no module of the network (module names look "
                                 f"like {', '.join(names[:3])})")


def summary(chosen: Dict[str, ModuleChoice], model: nn.Module,
            types: Tuple[type, ...] = CANDIDATE_TYPES) -> Dict[str, Any]:
    """Counts for the report: candidates, quantized modules by data type, parameters covered."""
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    covered = sum(p.numel() for name in chosen for p in modules[name].parameters(recurse=False))
    by_dtype: Dict[str, int] = {}
    for choice in chosen.values():
        key = choice.weights if choice.activations is None else f"{choice.weights}/{choice.activations}"
        by_dtype[key] = by_dtype.get(key, 0) + 1
    return {"candidates": len(candidate_modules(model, types)), "quantized_modules": len(chosen),
            "by_dtype": by_dtype, "parameters_total": total, "parameters_quantized": covered,
            "parameter_share": covered / total if total else 0.0}


def rules_to_dicts(rules: Sequence[LayerRule]) -> List[Dict[str, str]]:
    return [asdict(rule) for rule in rules]
