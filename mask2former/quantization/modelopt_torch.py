"""NVIDIA ModelOpt (``modelopt.torch.quantization``) quantization of chosen Linear/Conv layers.

Each chosen module gets explicit quantizer entries (``<module>.weight_quantizer`` and, in static_ptq,
``<module>.input_quantizer``) after a first entry that disables every quantizer, so exactly the modules
of :mod:`mask2former.quantization.selection` are quantized. Data types: int8 (8 bits; weights per output
channel), fp8_e4m3fn ((4, 3)), fp8_e5m2 ((5, 2)); fp8 is per tensor, as ModelOpt's FP8 presets.

Calibration (``quantize.algorithm``): ``minmax`` and ``max`` use ModelOpt's max calibrator (symmetric
range from the largest absolute value; "minmax" is TAO's name for it); ``entropy`` calibrates the
activations with the histogram calibrator and picks each range by KL divergence, the weights by max.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from torch import nn

from .selection import ModuleChoice

NUM_BITS = {"int8": 8, "fp8_e4m3fn": (4, 3), "fp8_e5m2": (5, 2)}
ALGORITHMS = {"minmax": "max", "max": "max", "entropy": "entropy"}


def _quantizer(dtype: str, *, weight: bool, calibrator: str) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {"num_bits": NUM_BITS[dtype], "axis": 0 if weight and dtype == "int8" else None}
    if calibrator != "max":
        cfg["calibrator"] = calibrator
    return cfg


def quant_entries(chosen: Dict[str, ModuleChoice], *, algorithm: str) -> List[Dict[str, Any]]:
    """Version-neutral entries [{"quantizer_name", "cfg" | "enable"}], first disabling everything."""
    activation_calibrator = "histogram" if ALGORITHMS[algorithm] == "entropy" else "max"
    entries: List[Dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name, choice in chosen.items():
        entries.append({"quantizer_name": f"{name}.weight_quantizer",
                        "cfg": _quantizer(choice.weights, weight=True, calibrator="max")})
        if choice.activations is not None:
            entries.append({"quantizer_name": f"{name}.input_quantizer",
                            "cfg": _quantizer(choice.activations, weight=False, calibrator=activation_calibrator)})
    return entries


def quant_config(chosen: Dict[str, ModuleChoice], *, algorithm: str, mtq: Any) -> Dict[str, Any]:
    """The ``config`` argument of ``mtq.quantize`` in the format of the installed ModelOpt: a list of
    entries (0.40 and later) or the older ordered mapping pattern -> attributes."""
    entries = quant_entries(chosen, algorithm=algorithm)
    list_format = isinstance(mtq.INT8_DEFAULT_CFG["quant_cfg"], list)
    if list_format:
        quant_cfg: Any = entries
    else:
        quant_cfg = {e["quantizer_name"]: e["cfg"] if "cfg" in e else {"enable": e["enable"]} for e in entries}
    # entropy: no built-in pass; quantizers are inserted uncalibrated and calibrated by calibrate_entropy.
    return {"quant_cfg": quant_cfg, "algorithm": None if ALGORITHMS[algorithm] == "entropy" else "max"}


def calibrate_entropy(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> None:
    """Collect statistics with ``forward_loop``, then load entropy ranges for the histogram-calibrated
    activation quantizers and max ranges for the rest."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    enable_stats_collection(model)
    forward_loop(model)
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        if name.endswith("input_quantizer"):
            module.load_calib_amax("entropy", strict=False)
        else:
            module.load_calib_amax(strict=False)
        module.enable_quant()
        module.disable_calib()


def apply_modelopt(model: nn.Module, chosen: Dict[str, ModuleChoice], *, algorithm: str, mtq: Any,
                   forward_loop: Optional[Callable[[nn.Module], None]]) -> nn.Module:
    """Quantize ``model`` (in place; returned). ``forward_loop`` runs calibration images through the model;
    None calibrates the weights only (weight_only_ptq)."""
    config = quant_config(chosen, algorithm=algorithm, mtq=mtq)
    static = any(choice.activations is not None for choice in chosen.values())
    if static and forward_loop is None:
        raise ValueError("static_ptq needs calibration images (dataset.quant_calibration_dataset.images_dir)")
    if config["algorithm"] is None:
        model = mtq.quantize(model, config, forward_loop=None)
        calibrate_entropy(model, forward_loop)
        return model
    return mtq.quantize(model, config, forward_loop=forward_loop)


def modelopt_state(model: nn.Module) -> Dict[str, Any]:
    import modelopt.torch.opt as mto

    return mto.modelopt_state(model)


def restore_modelopt(model: nn.Module, state: Dict[str, Any]) -> nn.Module:
    """Re-insert the saved quantizers into a freshly built fp32 model (weights loaded afterwards)."""
    import modelopt.torch.opt as mto

    return mto.restore_from_modelopt_state(model, state)
