"""The network exports to ONNX (opset 17, legacy exporter) with a dynamic batch axis and onnxruntime
reproduces PyTorch on a non-square input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from model_support import perturb_, tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Outputs(torch.nn.Module):
    """Tuple outputs for the exporter (the model returns a dict)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(swin={"depths": [2, 1, 2, 1]}, dec_layers=5).eval()
    perturb_(model, seed=4)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Outputs(model), (torch.randn(1, 3, 96, 160),), str(path), opset_version=17, dynamo=False,
            input_names=["images"], output_names=["pred_logits", "pred_masks"],
            dynamic_axes={"images": {0: "batch"}, "pred_logits": {0: "batch"}, "pred_masks": {0: "batch"}},
        )
    return model, path


def test_graph_is_valid_and_uses_grid_sample(exported):
    _, path = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "GridSample" in ops
    assert not ops & {"If", "Loop"}, f"data-dependent control flow in the graph: {ops & {'If', 'Loop'}}"


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_with_dynamic_batch(exported, batch):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(batch, 3, 96, 160, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(images)
    logits, masks = session.run(None, {"images": images.numpy()})
    assert logits.shape == (batch, 8, 6) and masks.shape == (batch, 8, 24, 40)
    np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(masks, expected["pred_masks"].numpy(), atol=1e-4, rtol=0)
