"""quantize with NVIDIA ModelOpt for PyTorch: a missing nvidia-modelopt fails at once in one sentence (always
tested, by hiding the package); the quantizer configuration in both ModelOpt formats; and, where
nvidia-modelopt is installed, static int8 (max and entropy calibration) with a reloadable artifact."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from evaluation_support import save_random_checkpoint, tiny_model_overrides
from mask2former import results
from mask2former.cli import main
from mask2former.data.synthetic import write_dataset
from mask2former.quantization.modelopt_torch import quant_config
from mask2former.quantization.selection import ModuleChoice

SIZE = 64
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt is not installed (a GPU-side requirement in "
                                           "requirements-gpu.txt)")


def _words(overrides):
    return [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
            for key, value in overrides.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    parent = save_random_checkpoint(root / "tiny.pth", mode="panoptic", seed=5)
    val = write_dataset(root / "val", dataset_format="coco_panoptic", num_images=2, size=SIZE, seed=0, stream=1)
    return SimpleNamespace(parent=parent, val=val)


def _quantize(out, data, *extra):
    return main(["quantize", "--results-dir", str(out), f"quantize.model_path={data.parent}",
                 *_words(tiny_model_overrides("panoptic")),
                 f"dataset.quant_calibration_dataset.images_dir={data.val / 'images.tar.gz'}",
                 "dataset.quant_calibration_dataset.num_images=2",
                 f"dataset.augmentation.test_min_size={SIZE}", f"dataset.augmentation.test_max_size={SIZE}", *extra])


@pytest.mark.parametrize("backend", ["modelopt.pytorch", "modelopt.onnx"])
def test_missing_modelopt_fails_at_once_in_one_sentence(backend, tmp_path, monkeypatch, data):
    for name in [n for n in sys.modules if n == "modelopt" or n.startswith("modelopt.")] + ["modelopt"]:
        monkeypatch.setitem(sys.modules, name, None)  # import modelopt... now raises ImportError
    out = tmp_path / "job"
    code = main(["quantize", "--results-dir", str(out), f"quantize.backend={backend}", "quantize.mode=static_ptq",
                 f"quantize.model_path={tmp_path / 'never_read.pth'}",
                 f"dataset.quant_calibration_dataset.images_dir={tmp_path / 'never_read'}"])
    assert code == 1
    message = results.read_status(out)[-1]["message"]
    assert message.startswith(f"quantize.backend {backend} needs nvidia-modelopt")
    assert "requirements-gpu.txt" in message and "which is not installed here" in message
    assert message.endswith(").") and "never_read" not in message


class _FakeModelopt:
    def __init__(self, list_format: bool) -> None:
        self.INT8_DEFAULT_CFG = {"quant_cfg": [] if list_format else {}, "algorithm": "max"}


def test_quant_config_names_each_chosen_quantizer_in_both_formats():
    chosen = {"a.fc": ModuleChoice("int8", "int8"), "b.conv": ModuleChoice("fp8_e4m3fn", None)}
    config = quant_config(chosen, algorithm="minmax", mtq=_FakeModelopt(list_format=True))
    assert config["algorithm"] == "max"
    assert config["quant_cfg"] == [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "a.fc.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "a.fc.input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
        {"quantizer_name": "b.conv.weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}]
    legacy = quant_config(chosen, algorithm="entropy", mtq=_FakeModelopt(list_format=False))
    assert legacy["algorithm"] is None  # entropy calibrates after insertion
    assert legacy["quant_cfg"]["*"] == {"enable": False}
    assert legacy["quant_cfg"]["a.fc.input_quantizer"] == {"num_bits": 8, "axis": None, "calibrator": "histogram"}
    assert list(legacy["quant_cfg"])[0] == "*"  # the catch-all comes first, the modules override it


@needs_modelopt
def test_static_int8_with_max_calibration_makes_a_reloadable_model(tmp_path, data):
    out = tmp_path / "job"
    code = _quantize(out, data, "quantize.backend=modelopt.pytorch", "quantize.mode=static_ptq",
                     "quantize.algorithm=max", 'quantize.skip_names=["backbone.patch_embed.*"]')
    assert code == 0, results.read_status(out)
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["calibration_images"] == 2 and report["details"]["round_trip_max_abs_diff"] <= 1e-5
    assert set(report["selection"]["by_dtype"]) == {"int8/int8"}
    assert not any(n.startswith("backbone.patch_embed") for n in report["record"]["modules"])
    assert report["accuracy"]["skipped"]

    from mask2former.quantization.artifact import load_quantized
    from modelopt.torch.quantization.nn import TensorQuantizer

    model, _, record = load_quantized(out / "quantized_model_modelopt_pytorch.pth")
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    assert quantizers and all(n.rsplit(".", 1)[0] in record.modules for n in quantizers)
    qkv = quantizers["backbone.layers.0.blocks.0.attn.qkv.input_quantizer"]
    assert qkv.amax is not None and float(qkv.amax.max()) > 0  # calibrated on the images
    assert "backbone.patch_embed.proj.weight_quantizer" not in quantizers


@needs_modelopt
def test_entropy_calibration_sets_activation_ranges(tmp_path, data):
    out = tmp_path / "job"
    layers = [{"module_name": "transformer_decoder.class_embed", "weights": {"dtype": "int8"},
               "activations": {"dtype": "int8"}}]
    code = _quantize(out, data, "quantize.backend=modelopt.pytorch", "quantize.mode=static_ptq",
                     "quantize.algorithm=entropy", f"quantize.layers={json.dumps(layers)}")
    assert code == 0, results.read_status(out)
    from mask2former.quantization.artifact import load_quantized

    model, _, record = load_quantized(out / "quantized_model_modelopt_pytorch.pth")
    assert list(record.modules) == ["transformer_decoder.class_embed"] and record.algorithm == "entropy"
    head = model.transformer_decoder.class_embed
    assert head.input_quantizer.is_enabled and torch.isfinite(head.input_quantizer.amax).all()
    assert float(head.input_quantizer.amax) > 0
