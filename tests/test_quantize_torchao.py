"""quantize with the default torchao backend: int8 weight-only artifact, its report (size, latency,
accuracy against the fp32 parent), the save/rebuild round trip, layer selection, and evaluate/runner
support of the quantized artifact."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from evaluation_support import save_random_checkpoint, tiny_model_overrides
from mask2former import results
from mask2former.checkpoint import build_model_from_checkpoint
from mask2former.cli import main
from mask2former.data.synthetic import write_dataset
from mask2former.quantization.artifact import load_quantized
from mask2former.quantization.selection import LayerRule, ModuleChoice, check_patterns_match, select_modules
from mask2former.quantization.torchao_backend import apply_torchao
from mask2former.runtime import load_runner, runner_kind_for

SIZE = 64
torchao_quantization = pytest.importorskip("torchao.quantization", reason="torchao is in requirements.txt")


def _words(overrides):
    return [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
            for key, value in overrides.items()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("parent") / "tiny.pth", mode="panoptic", seed=4)


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "val", dataset_format="coco_panoptic", num_images=2,
                         size=SIZE, seed=0, stream=1)


def _data_words(val_root):
    return _words({"dataset.val.type": "coco_panoptic", "dataset.val.img_dir": str(val_root / "images.tar.gz"),
                   "dataset.val.panoptic_json": str(val_root / "annotations_panoptic.json"),
                   "dataset.val.panoptic_dir": str(val_root / "images_panoptic.tar.gz"),
                   "dataset.label_map": str(val_root / "label_map_panoptic.json"), "dataset.val.num_workers": 0})


def _quantize(out, parent, *extra, val_root=None):
    words = ["quantize", "--results-dir", str(out), f"quantize.model_path={parent}",
             *_words(tiny_model_overrides("panoptic")), *extra,
             # latency is measured at the evaluation size: keep it small
             f"dataset.augmentation.test_min_size={SIZE}", f"dataset.augmentation.test_max_size={SIZE}"]
    if val_root is not None:
        words += _data_words(val_root)
    return main(words)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, parent, val_root):
    out = tmp_path_factory.mktemp("quantize") / "job"
    assert _quantize(out, parent, val_root=val_root) == 0, results.read_status(out)
    return out


def test_default_quantize_writes_an_int8_artifact_and_its_report(quantized):
    artifact = quantized / "quantized_model_torchao.pth"
    assert artifact.is_file()
    last = results.read_status(quantized)[-1]
    assert last["status"] == "SUCCESS" and last["kpi"]["size_ratio"] < 0.35
    report = json.loads((quantized / "quantize_report.json").read_text())
    assert report["backend"] == "torchao" and report["mode"] == "weight_only_ptq" and report["device"] == "cpu"
    assert report["size"]["ratio"] == pytest.approx(report["size"]["quantized_bytes"] / report["size"]["fp32_bytes"])
    assert report["size"]["ratio"] <= 0.35
    assert report["details"]["round_trip_max_abs_diff"] == 0.0
    assert report["latency"]["fp32_ms"] > 0 and report["latency"]["quantized_ms"] > 0
    assert report["latency"]["input_size"] == [SIZE, SIZE]
    selection = report["selection"]
    assert selection["quantized_modules"] == selection["candidates"] > 0 and selection["by_dtype"] == {
        "int8": selection["quantized_modules"]}
    accuracy = report["accuracy"]
    assert accuracy["num_images"] == 2
    for key in ("mIoU", "PQ"):
        assert accuracy["drop"][key] == pytest.approx(accuracy["fp32"][key] - accuracy["quantized"][key])
    metrics = results.read_metrics(quantized)
    assert metrics["mIoU"] == accuracy["quantized"]["mIoU"] and metrics["mIoU_fp32"] == accuracy["fp32"]["mIoU"]
    assert report["record"]["versions"]["torchao"]


def test_the_artifact_rebuilds_into_the_same_quantized_model(quantized, parent):
    model, config, record = load_quantized(quantized / "quantized_model_torchao.pth")
    assert record.backend == "torchao" and record.modules
    fresh, _ = build_model_from_checkpoint(parent)
    apply_torchao(fresh, record.modules, torchao_quantization=torchao_quantization)
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rebuilt = model(images)["pred_masks"]
        expected = fresh(images)["pred_masks"]
        fp32 = build_model_from_checkpoint(parent)[0](images)["pred_masks"]
    assert torch.equal(rebuilt, expected)
    assert not torch.equal(rebuilt, fp32)  # the int8 weights really changed the numbers
    assert (rebuilt - fp32).abs().max() < 0.5
    name = next(iter(record.modules))
    weight = dict(model.named_modules())[name].weight
    assert type(weight) is not torch.nn.Parameter or weight.dtype != torch.float32  # a quantized tensor


def test_evaluate_accepts_the_quantized_artifact(quantized, val_root, tmp_path):
    artifact = quantized / "quantized_model_torchao.pth"
    assert runner_kind_for(artifact) == "quantized"
    assert results.resolve_parent_model(quantized, kind="quantized") == artifact
    out = tmp_path / "evaluate"
    assert main(["evaluate", "--results-dir", str(out), f"evaluate.checkpoint={artifact}",
                 *_words(tiny_model_overrides("panoptic")), *_data_words(val_root),
                 f"dataset.augmentation.test_min_size={SIZE}", f"dataset.augmentation.test_max_size={SIZE}"]) == 0
    metrics = results.read_metrics(out)
    report = json.loads((quantized / "quantize_report.json").read_text())
    assert metrics["model"]["kind"] == "quantized"
    assert metrics["mIoU"] == pytest.approx(report["accuracy"]["quantized"]["mIoU"], abs=1e-9)


def test_load_runner_serves_the_quantized_kind(quantized):
    config = SimpleNamespace(model=None)
    runner = load_runner("quantized", quantized / "quantized_model_torchao.pth", config, "cpu")
    outputs = runner(torch.zeros(1, 3, SIZE, SIZE))
    assert runner.mode == "panoptic" and "pan_mask_probs" in outputs and runner.fixed_input_size is None


def test_skip_names_and_layers_choose_the_modules(tmp_path, parent):
    out = tmp_path / "job"
    layers = [{"module_name": "transformer_decoder.*", "weights": {"dtype": "int8"},
               "activations": {"dtype": "int8"}},
              {"module_name": "transformer_decoder.class_embed", "weights": {"dtype": "native"},
               "activations": {"dtype": "native"}}]
    code = _quantize(out, parent, f"quantize.layers={json.dumps(layers)}",
                     'quantize.skip_names=["transformer_decoder.mask_embed.*"]')
    assert code == 0, results.read_status(out)
    report = json.loads((out / "quantize_report.json").read_text())
    modules = report["record"]["modules"]
    assert modules and all(name.startswith("transformer_decoder.") for name in modules)
    assert "transformer_decoder.class_embed" not in modules
    assert not any(name.startswith("transformer_decoder.mask_embed.") for name in modules)
    assert report["accuracy"] == {"skipped": "dataset.val is not set, so accuracy was not measured"}
    model, _, _ = load_quantized(out / "quantized_model_torchao.pth")
    assert type(model.backbone.layers[0].blocks[0].attn.qkv.weight) is torch.nn.Parameter  # untouched


def test_a_pattern_matching_no_module_is_named(tmp_path, parent):
    out = tmp_path / "job"
    assert _quantize(out, parent, 'quantize.skip_names=["backbone.nothing_like_this"]') == 1
    message = results.read_status(out)[-1]["message"]
    assert "quantize.skip_names pattern 'backbone.nothing_like_this' matches no module" in message
    assert not (out / "quantized_model_torchao.pth").exists()


def test_selection_rules():
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(4, 4))
    model.add_module("b", torch.nn.Conv2d(4, 4, 1))
    model.add_module("c", torch.nn.Linear(4, 4))
    model.add_module("n", torch.nn.LayerNorm(4))
    everything = select_modules(model, layers=[], skip_names=[], static=False)
    assert everything == {"a": ModuleChoice("int8", None), "b": ModuleChoice("int8", None),
                          "c": ModuleChoice("int8", None)}
    static = select_modules(model, layers=[], skip_names=["b"], static=True)
    assert static == {"a": ModuleChoice("int8", "int8"), "c": ModuleChoice("int8", "int8")}
    rules = [LayerRule("*", "int8", "int8"), LayerRule("c", "fp8_e4m3fn", "native")]
    assert select_modules(model, layers=rules, skip_names=[], static=True, types=(torch.nn.Linear,)) == {
        "a": ModuleChoice("int8", "int8"), "c": ModuleChoice("fp8_e4m3fn", None)}
    with pytest.raises(ValueError, match="'z\\*' matches no module"):
        check_patterns_match(model, layers=[LayerRule("z*")], skip_names=[])
