"""export: checkpoint -> ONNX (checked, simplified) -> proof that onnxruntime matches PyTorch.

Everything is written in a hidden work folder beside the target; ``model.onnx`` (or ``export.onnx_file``)
appears only after the parity check passed, so a failed export never leaves a model behind.
``export_report.json`` is written either way.

Parity inputs: two seeded batches of the traced batch size (2 for a dynamic axis) and, for a dynamic
axis, one batch of 1, which catches a graph that baked the traced batch size into a reshape.

Running out of memory or disk ends with FAILURE naming the keys that help
(:mod:`mask2former.actions.resource_failures`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List

import onnx
import onnxruntime
import torch

from .. import results
from ..checkpoint import CheckpointError, build_model_from_checkpoint, publish_model_file, read_checkpoint
from ..export.metadata import ModelRecord
from ..export.onnx_export import ExportedGraph, export_onnx, graph_io, trace_batch
from ..export.parity import ParityResult, check_parity, sample_inputs
from ..export.simplify import SimplifyResult, simplify_onnx
from ..runtime.inference_model import InferenceModel
from ..runtime.onnx_runner import OnnxRunner
from ..training.tracking import log_exported_model
from ..uris import without_credentials
from .job import ActionError, ActionResult, Job
from ..model_files import resolve_model_file
from .resource_failures import reports_resource_failures

REPORT_FILE = "export_report.json"
PARITY_BATCHES = 2
PARITY_SEED = 0


def export_device(*, on_cpu: bool, gpu_id: int = 0) -> torch.device:
    """The CPU, or GPU ``gpu_id`` (export.gpu_id, as in TAO) when ``on_cpu`` is false."""
    if on_cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ActionError("export.on_cpu is false, which traces the model on a CUDA GPU, but this machine "
                          "has no CUDA GPU: set export.on_cpu to true or run on a GPU machine.")
    if gpu_id >= torch.cuda.device_count():
        raise ActionError(f"export.gpu_id is {gpu_id}, but this machine has {torch.cuda.device_count()} CUDA "
                          "GPU(s).")
    return torch.device(f"cuda:{gpu_id}")




def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker errors come in several types
        raise ActionError(f"The exported graph fails the ONNX checker: {exc}") from exc


class GraphRunError(RuntimeError):
    """onnxruntime failed to run the exported graph on a parity batch."""


def parity_inputs(cfg: Any) -> List[torch.Tensor]:
    """PARITY_BATCHES batches of the traced batch size, plus one batch of 1 for a dynamic batch axis (a
    graph that baked the traced batch size into a shape fails there)."""
    shape = dict(channels=cfg.input_channel, height=cfg.input_height, width=cfg.input_width)
    inputs = sample_inputs(batch=trace_batch(cfg.batch_size), count=PARITY_BATCHES, seed=PARITY_SEED, **shape)
    if cfg.batch_size == -1:
        inputs += sample_inputs(batch=1, count=1, seed=PARITY_SEED + 1, **shape)
    return inputs


def _reporting_failures(runner: OnnxRunner):
    def run(images: torch.Tensor):
        try:
            return runner(images)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphRunError(f"onnxruntime cannot run the exported graph on a batch of {images.shape[0]} "
                                f"({first_line})") from exc
    return run


def build_report(*, checkpoint: Path, target: Path, graph: ExportedGraph, io: Dict[str, Any], mode: str,
                 num_classes: int, simplification: SimplifyResult, parity: ParityResult, device: torch.device,
                 size_bytes: int) -> Dict[str, Any]:
    return {
        "checkpoint": str(checkpoint), "onnx_file": str(target), "written": parity.passed, "mode": mode,
        "num_classes": num_classes, "device": str(device), "opset_version": graph.opset_version,
        "exporter": "torch.onnx.export(dynamo=False)", "dynamic_batch": graph.dynamic_batch,
        "input": {"name": graph.input_name, "shape": graph.input_shape},
        "inputs": io["inputs"], "outputs": io["outputs"], "output_names": graph.output_names,
        "simplification": simplification.to_dict(), "parity": parity.to_dict(), "size_bytes": size_bytes,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


@reports_resource_failures("export")
def run(config: Any, job: Job) -> ActionResult:
    cfg = config.export
    device = export_device(on_cpu=cfg.on_cpu, gpu_id=cfg.gpu_id)
    checkpoint = resolve_model_file("export.checkpoint", cfg.checkpoint)
    try:
        payload = read_checkpoint(checkpoint, encryption_key=config.encryption_key)
        model, model_cfg = build_model_from_checkpoint(payload, config.model)
    except CheckpointError as exc:
        raise ActionError(str(exc)) from exc
    wrapped = InferenceModel(model, mode=model_cfg.mode, topk=model_cfg.test_topk_per_image).to(device).eval()
    record = ModelRecord(mode=model_cfg.mode, num_classes=int(model_cfg.sem_seg_head.num_classes),
                         topk=int(model_cfg.test_topk_per_image), model_config=payload.get("model_config") or {},
                         label_map=payload.get("label_map"), contiguous_id=bool(payload.get("contiguous_id", False)))
    target = Path(cfg.onnx_file) if cfg.onnx_file else job.results_dir / results.ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}-export-") as work:
        raw, final = Path(work) / "exported.onnx", Path(work) / "model.onnx"
        job.status.running(f"tracing {model_cfg.mode} model at {cfg.input_height}x{cfg.input_width}, opset "
                           f"{cfg.opset_version}, batch {'dynamic' if cfg.batch_size == -1 else cfg.batch_size}")
        graph = export_onnx(wrapped, raw, output_names=wrapped.output_names, input_height=cfg.input_height,
                            input_width=cfg.input_width, input_channel=cfg.input_channel,
                            batch_size=cfg.batch_size, opset_version=cfg.opset_version, device=device,
                            record=record, verbose=cfg.verbose)
        _check_model(raw)
        job.status.running("simplifying the graph")
        simplification = simplify_onnx(raw, final)
        job.log.info("export: %s", simplification.message)
        _check_model(final)
        job.status.running("checking onnxruntime against PyTorch")
        # Both sides in fp32 on the CPU, whatever device traced: GPU kernels (TF32 convolutions in PyTorch,
        # TF32 in onnxruntime's CUDA provider) would blur the comparison of the graph with the model.
        runner = OnnxRunner(final, device="cpu")
        reference = wrapped.cpu()
        inputs = parity_inputs(cfg)
        try:
            parity = check_parity(reference, _reporting_failures(runner), inputs, tolerance=cfg.parity_tolerance)
        except GraphRunError as exc:
            results.write_json(job.results_dir / REPORT_FILE, {
                "checkpoint": str(checkpoint), "onnx_file": str(target), "written": False,
                "simplification": simplification.to_dict(), "parity": {"passed": False, "error": str(exc)}})
            raise ActionError(f"{exc}; no ONNX file was written.") from exc
        report = build_report(checkpoint=checkpoint, target=target, graph=graph, io=graph_io(final),
                              mode=model_cfg.mode, num_classes=record.num_classes, simplification=simplification,
                              parity=parity, device=device, size_bytes=final.stat().st_size)
        results.write_json(job.results_dir / REPORT_FILE, report)
        if not parity.passed:
            raise ActionError(f"onnxruntime does not match PyTorch: {parity.describe_failure()} "
                              f"(export.parity_tolerance); no ONNX file was written, see {REPORT_FILE}.")
        publish_model_file(final, target, encryption_key=config.encryption_key)
    try:
        log_exported_model(config.mlflow, model_file=target, checkpoint=checkpoint, results_dir=job.results_dir,
                           log=job.log)
    except Exception as exc:  # noqa: BLE001 - MLflow and its HTTP layer raise many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        raise ActionError(f"{target} was written, but logging it to MLflow failed ({type(exc).__name__}: "
                          f"{without_credentials(first_line)}); check mlflow.tracking_uri / "
                          "MLFLOW_TRACKING_URI.") from None
    metrics = {"parity_max_abs_diff": parity.max_abs_diff, "parity_tolerance": parity.tolerance,
               "simplified": simplification.applied, "onnx_size_bytes": report["size_bytes"],
               "opset_version": graph.opset_version}
    return ActionResult(message=f"exported {target.name} ({model_cfg.mode}, {cfg.input_height}x{cfg.input_width}); "
                                f"onnxruntime matches PyTorch within {parity.max_abs_diff:.2g}",
                        metrics=metrics, kpi={"parity_max_abs_diff": parity.max_abs_diff},
                        artifacts={"onnx": str(target)})
