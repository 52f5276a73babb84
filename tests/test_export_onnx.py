"""ONNX export of the inference model, function level: each mode traces, passes the checker, records its
metadata and matches PyTorch in onnxruntime; dynamic and fixed batch axes; parity comparison rules;
simplification fallback."""

from __future__ import annotations

import onnx
import pytest
import torch

from evaluation_support import NUM_CLASSES, tiny_model_overrides
from mask2former.config import load_spec
from mask2former.export.metadata import ModelRecord, read_record
from mask2former.export.onnx_export import export_onnx, graph_io
from mask2former.export.parity import check_parity, compare_outputs, sample_inputs
from mask2former.export.simplify import simplify_onnx
from mask2former.model import build_model
from mask2former.runtime.inference_model import InferenceModel, output_names
from mask2former.runtime.onnx_runner import OnnxRunner

HEIGHT, WIDTH, TOPK, QUERIES = 64, 96, 10, 6


def _inference_model(mode: str) -> InferenceModel:
    config = load_spec("export", overrides=tiny_model_overrides(mode, **{"export.checkpoint": "unused.pth"}))
    torch.manual_seed(1)
    return InferenceModel(build_model(config.model).eval(), mode=mode, topk=TOPK).eval()


def _record(mode: str) -> ModelRecord:
    return ModelRecord(mode=mode, num_classes=NUM_CLASSES, topk=TOPK, model_config={"mode": mode},
                       label_map=[{"id": 1, "name": "sky", "color": [1, 2, 3], "isthing": 0}])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One dynamic-batch export per mode: {mode: (InferenceModel, path, ExportedGraph)}."""
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for mode in ("semantic", "instance", "panoptic"):
        model = _inference_model(mode)
        path = folder / f"{mode}.onnx"
        graph = export_onnx(model, path, output_names=model.output_names, input_height=HEIGHT, input_width=WIDTH,
                            batch_size=-1, opset_version=17, record=_record(mode))
        out[mode] = (model, path, graph)
    return out


@pytest.mark.parametrize("mode", ["semantic", "instance", "panoptic"])
def test_each_mode_passes_the_checker_and_matches_pytorch(exported, mode):
    model, path, graph = exported[mode]
    onnx.checker.check_model(str(path), full_check=True)
    assert graph.output_names == list(output_names(mode))
    assert graph.input_shape == ["batch", 3, HEIGHT, WIDTH] and graph.dynamic_batch
    runner = OnnxRunner(path)
    assert runner.mode == mode and runner.num_classes == NUM_CLASSES
    assert runner.fixed_input_size == (HEIGHT, WIDTH) and runner.max_batch_size is None
    inputs = sample_inputs(batch=2, channels=3, height=HEIGHT, width=WIDTH, count=2, seed=3)
    parity = check_parity(model, runner, inputs, tolerance=1e-3)
    assert parity.passed, parity.to_dict()
    assert set(parity.outputs) == set(output_names(mode))
    assert parity.max_abs_diff < 1e-4
    assert parity.outputs["sem_scores"].gated
    if mode != "semantic":
        assert parity.outputs["inst_classes"].mismatches == 0


def test_graph_records_output_shapes_and_model_metadata(exported):
    _, path, graph = exported["panoptic"]
    io = graph_io(path)
    assert io["inputs"] == {"inputs": ["batch", 3, HEIGHT, WIDTH]}
    assert io["outputs"]["sem_scores"] == ["batch", NUM_CLASSES, HEIGHT // 4, WIDTH // 4]
    assert io["outputs"]["pan_mask_probs"] == ["batch", QUERIES, HEIGHT // 4, WIDTH // 4]
    assert io["outputs"]["inst_mask_logits"] == ["batch", TOPK, HEIGHT // 4, WIDTH // 4]
    assert graph.output_shapes == io["outputs"]
    record = read_record(onnx.load(str(path)))
    assert record == _record("panoptic")


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_runs_other_batch_sizes(exported, batch):
    model, path, _ = exported["instance"]
    runner = OnnxRunner(path)
    images = sample_inputs(batch=batch, channels=3, height=HEIGHT, width=WIDTH, count=1, seed=batch)[0]
    outputs = runner(images)
    assert outputs["sem_scores"].shape == (batch, NUM_CLASSES, HEIGHT // 4, WIDTH // 4)
    assert outputs["inst_classes"].dtype == torch.int64
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(outputs["inst_mask_logits"], expected["inst_mask_logits"], atol=1e-4)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A semantic model exported with a fixed batch of 2 at opset 16: (InferenceModel, path, ExportedGraph)."""
    model = _inference_model("semantic")
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    graph = export_onnx(model, path, output_names=model.output_names, input_height=HEIGHT, input_width=WIDTH,
                        batch_size=2, opset_version=16, record=_record("semantic"))
    return model, path, graph


def test_fixed_batch_export_pads_smaller_batches_and_refuses_larger(fixed):
    model, path, graph = fixed
    assert graph.input_shape == [2, 3, HEIGHT, WIDTH] and not graph.dynamic_batch
    assert graph_io(path)["outputs"]["sem_scores"] == [2, NUM_CLASSES, HEIGHT // 4, WIDTH // 4]
    runner = OnnxRunner(path)
    assert runner.max_batch_size == 2 and runner.mode == "semantic"
    assert runner.num_classes == NUM_CLASSES
    one = sample_inputs(batch=1, channels=3, height=HEIGHT, width=WIDTH, count=1, seed=5)[0]
    with torch.no_grad():
        expected = model(one)["sem_scores"]
    got = runner(one)["sem_scores"]
    assert got.shape == (1, NUM_CLASSES, HEIGHT // 4, WIDTH // 4)
    assert torch.allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="at most 2 images"):
        runner(torch.zeros(3, 3, HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="exported for 64x96"):
        runner(torch.zeros(1, 3, 96, 96))


def test_opset_version_is_written(fixed):
    graph = onnx.load(str(fixed[1]))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 16
    assert "GridSample" in {n.op_type for n in graph.graph.node}


# ---------------------------------------------------------------- parity rules
def _outputs(scores, classes, masks):
    return {"inst_scores": torch.tensor([scores]), "inst_classes": torch.tensor([classes]),
            "inst_mask_logits": torch.tensor([masks], dtype=torch.float32)[..., None, None].expand(1, len(scores), 2, 2)}


def test_a_perturbed_output_fails_the_gate():
    reference = {"sem_scores": torch.zeros(1, 2, 4, 4)}
    candidate = {"sem_scores": torch.zeros(1, 2, 4, 4)}
    candidate["sem_scores"][0, 1, 2, 3] = 0.01
    result = check_parity(lambda x: reference, lambda x: candidate, [torch.zeros(1)], tolerance=1e-3)
    assert not result.passed
    assert result.worst.name == "sem_scores" and result.max_abs_diff == pytest.approx(0.01)
    assert "'sem_scores' differs by up to 0.01" in result.describe_failure()
    assert result.to_dict()["failures"] == ["sem_scores"]
    assert check_parity(lambda x: reference, lambda x: candidate, [torch.zeros(1)], tolerance=0.02).passed


def test_panoptic_class_flips_fail_unless_the_winner_could_be_tied():
    reference = {"pan_scores": torch.tensor([[0.9, 0.45]]), "pan_classes": torch.tensor([[2, 1]])}
    near_tie = {"pan_scores": torch.tensor([[0.9, 0.45]]), "pan_classes": torch.tensor([[2, 4]])}
    result = check_parity(lambda x: reference, lambda x: near_tie, [torch.zeros(1)], tolerance=1e-3)
    assert result.passed and result.outputs["pan_classes"].mismatches == 1
    confident_flip = {"pan_scores": torch.tensor([[0.9, 0.45]]), "pan_classes": torch.tensor([[3, 1]])}
    result = check_parity(lambda x: reference, lambda x: confident_flip, [torch.zeros(1)], tolerance=1e-3)
    assert not result.passed and "'pan_classes' has 1 differing class indices" in result.describe_failure()


def test_near_tie_swap_in_topk_is_accepted_and_counted():
    reference = _outputs([0.9, 0.50000, 0.49999, 0.1], [3, 1, 2, 0], [5.0, 1.0, -1.0, 0.0])
    swapped = _outputs([0.9, 0.49999, 0.50000, 0.1], [3, 2, 1, 0], [5.0, -1.0, 1.0, 0.0])
    diffs = compare_outputs(reference, swapped, gated=["inst_scores", "inst_mask_logits"], tolerance=1e-3)
    assert diffs["inst_scores"].max_abs_diff < 1e-3 and diffs["inst_mask_logits"].max_abs_diff < 1e-3
    assert diffs["inst_classes"].mismatches == 2 and diffs["inst_classes"].unexplained == 0
    assert diffs["inst_scores"].swapped_entries == 2


def test_a_wrong_class_in_topk_is_not_explained_away_as_a_swap():
    reference = _outputs([0.9, 0.5, 0.4, 0.1], [3, 1, 2, 0], [5.0, 1.0, -1.0, 0.0])
    wrong = _outputs([0.9, 0.5, 0.4, 0.1], [3, 2, 1, 0], [5.0, 1.0, -1.0, 0.0])  # same values, classes swapped
    diffs = compare_outputs(reference, wrong, gated=["inst_scores", "inst_mask_logits"], tolerance=1e-3)
    assert diffs["inst_classes"].unexplained == 2 and diffs["inst_scores"].swapped_entries == 0
    result = check_parity(lambda x: reference, lambda x: wrong, [torch.zeros(1)], tolerance=1e-3)
    assert not result.passed and [d.name for d in result.failures] == ["inst_classes"]


def test_missing_or_reshaped_outputs_are_named():
    reference = {"sem_scores": torch.zeros(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="lacks the outputs"):
        compare_outputs(reference, {}, gated=[], tolerance=1e-3)
    with pytest.raises(ValueError, match="sem_scores"):
        compare_outputs(reference, {"sem_scores": torch.zeros(1, 2, 4, 5)}, gated=[], tolerance=1e-3)


def test_sample_inputs_are_seeded_and_normalised():
    a = sample_inputs(batch=2, channels=3, height=32, width=48, count=2, seed=7)
    b = sample_inputs(batch=2, channels=3, height=32, width=48, count=2, seed=7)
    assert len(a) == 2 and a[0].shape == (2, 3, 32, 48) and a[0].dtype == torch.float32
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    assert abs(float(a[0].mean())) < 0.5 and 0.5 < float(a[0].std()) < 1.6


# ---------------------------------------------------------------- simplification
def test_simplification_shrinks_the_graph_and_keeps_metadata(fixed, tmp_path):
    _, path, _ = fixed
    target = tmp_path / "slim.onnx"
    result = simplify_onnx(path, target)
    assert result.applied, result.message
    assert result.nodes_after < result.nodes_before
    assert read_record(onnx.load(str(target))).mode == "semantic"


def test_failed_simplification_keeps_the_unsimplified_graph(fixed, tmp_path):
    _, path, _ = fixed
    target = tmp_path / "kept.onnx"

    def broken(model):
        raise RuntimeError("simplifier exploded")

    result = simplify_onnx(path, target, simplifier=broken)
    assert not result.applied and "simplifier exploded" in result.message
    assert result.nodes_after == result.nodes_before
    assert target.read_bytes() == path.read_bytes()
