"""quantize: post-training quantization of a checkpoint, with a size, latency and accuracy report.

Order: the backend's package is imported first (a missing nvidia-modelopt fails at once in one sentence),
then the parent checkpoint, the module selection, calibration images (static_ptq; always for
modelopt.onnx), the quantization itself, the artifact, a reload check of the artifact, and the
comparison with the fp32 parent:

- size: serialized weights (fp32 state_dict vs quantized state_dict; ONNX: the two files);
- latency: median ms per image on the same inputs (``quantize.device``);
- accuracy: dataset.val through the evaluate pipeline for both models (skipped, with the reason, when
  dataset.val is not set), and the drop in points.

Artifacts: ``quantized_model_<backend>.pth`` (torchao, modelopt.pytorch) or
``quantized_model_modelopt_onnx.onnx``, and ``quantize_report.json``.

Encryption: with ``encryption_key`` an encrypted parent checkpoint is opened in memory (a missing or wrong key
is refused right after the backend check, before anything else is read) and the artifact is written encrypted;
the report's sizes compare the plaintext models. modelopt.onnx works on files: its fp32 export and the
quantized graph exist in plaintext only in a hidden work folder of the job, removed when the action ends.
Running out of memory or disk ends with FAILURE naming the keys that help
(:mod:`mask2former.actions.resource_failures`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import results
from ..checkpoint import CheckpointError, build_model_from_checkpoint, publish_model_file, read_checkpoint
from ..data.build import build_datasets
from ..data.dataset import ImageFolderDataset
from ..evaluation.inputs import FitTransform, collate_to_size
from ..export.metadata import ModelRecord, write_record
from ..export.onnx_export import export_onnx
from ..export.parity import sample_inputs
from ..quantization.artifact import QuantizationRecord, load_quantized, modules_dict, save_quantized, state_dict_bytes
from ..quantization.dependencies import require_backend
from ..quantization.measure import accuracy_drop, accuracy_summary, compare_latency, evaluate_on_val
from ..quantization.selection import (CANDIDATE_TYPES, check_patterns_match, rules_from_config, rules_to_dicts,
                                      select_modules, summary)
from ..runtime.inference_model import InferenceModel
from ..runtime.onnx_runner import OnnxRunner
from ..runtime.torch_runner import TorchRunner
from .job import ActionError, ActionResult, Job
from ..model_files import require_model_key, resolve_model_file
from .resource_failures import reports_resource_failures

REPORT_FILE = "quantize_report.json"
LATENCY_RUNS = 5
CALIBRATION_BATCH = 4


def quantize_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (the first GPU) or ``cuda:N``, as TAO writes it."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ActionError("quantize.device is cuda, but this machine has no CUDA GPU: set quantize.device to cpu "
                              "or run on a GPU machine.")
        return torch.device(device if ":" in device else "cuda:0")
    return torch.device("cpu")


def quant_input_size(dataset_cfg: Any) -> Tuple[int, int]:
    """(H, W) of calibration, latency and fixed-size (ONNX) inputs: test_min_size x test_max_size, rounded up
    to size_divisibility (the box every evaluation image fits in after its resize)."""
    aug = dataset_cfg.augmentation
    step = max(32, int(aug.size_divisibility))
    return (int(math.ceil(aug.test_min_size / step) * step), int(math.ceil(aug.test_max_size / step) * step))


def calibration_batches(config: Any, *, size: Tuple[int, int]) -> List[torch.Tensor]:
    """The calibration images, resized to fit ``size`` and padded to it, in batches."""
    section = config.dataset.quant_calibration_dataset
    if not section.images_dir:
        raise ActionError("dataset.quant_calibration_dataset.images_dir is not set: static quantization and "
                          "quantize.backend modelopt.onnx need calibration images.")
    transform = FitTransform(box=size, pixel_mean=config.dataset.pixel_mean, pixel_std=config.dataset.pixel_std)
    try:
        images = ImageFolderDataset(root=section.images_dir, transform=transform,
                                    key="dataset.quant_calibration_dataset.images_dir", max_images=section.num_images)
    except (OSError, ValueError) as exc:
        raise ActionError(f"dataset.quant_calibration_dataset.images_dir: {exc}") from exc
    items = [images[i] for i in range(len(images))]
    return [collate_to_size(items[i:i + CALIBRATION_BATCH], size=size)["images"]
            for i in range(0, len(items), CALIBRATION_BATCH)]


def _forward_loop(batches: List[torch.Tensor], device: torch.device):
    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for images in batches:
                model(images.to(device))
    return loop


def _val_dataset(config: Any):
    if not any(getattr(config.dataset.val, key) for key in ("img_dir", "instance_json", "panoptic_json", "annot_file")):
        return None
    try:
        return build_datasets(config, "val")
    except (OSError, ValueError) as exc:
        raise ActionError(f"dataset.val: {exc}") from exc


@dataclass
class _Quantized:
    """What a backend produced: the artifact, runners of the fp32 reference and of the reloaded artifact,
    the two sizes compared, and backend details for the report."""

    artifact: Path
    reference: Any
    quantized: Any
    fp32_bytes: int
    quantized_bytes: int
    details: Dict[str, Any]


def _quantize_pytorch(*, backend: str, module: Any, config: Any, job: Job, payload: Dict[str, Any],
                      model: torch.nn.Module, model_cfg: Any, chosen: Dict, device: torch.device,
                      batches: Optional[List[torch.Tensor]], record: QuantizationRecord) -> _Quantized:
    reference_model = copy.deepcopy(model)
    modelopt_state = None
    if backend == "torchao":
        from ..quantization.torchao_backend import apply_torchao

        apply_torchao(model, chosen, torchao_quantization=module)
    else:
        from ..quantization.modelopt_torch import apply_modelopt, modelopt_state as state_of

        model = model.to(device)
        loop = _forward_loop(batches, device) if batches else None
        model = apply_modelopt(model, chosen, algorithm=config.quantize.algorithm, mtq=module, forward_loop=loop)
        modelopt_state = state_of(model)
    model = model.cpu().eval()
    artifact = job.results_dir / results.quantized_name(backend, "pth")
    save_quantized(artifact, model=model, parent=payload, record=record, modelopt_state=modelopt_state,
                   encryption_key=config.encryption_key)
    reloaded, reloaded_cfg, _ = load_quantized(artifact, config.model, encryption_key=config.encryption_key)
    probe = sample_inputs(batch=1, channels=3, height=64, width=64, count=1, seed=0)[0]
    with torch.no_grad():
        before = model(probe)["pred_masks"]
        after = reloaded(probe)["pred_masks"]
    round_trip = float((before - after).abs().max())
    if round_trip > 1e-5:
        raise ActionError(f"The saved quantized model does not reproduce the quantized model (max abs difference "
                          f"{round_trip:.3g}); {artifact.name} is not usable.")
    return _Quantized(artifact=artifact, reference=TorchRunner(reference_model, model_cfg=model_cfg, device=device),
                      quantized=TorchRunner(reloaded, model_cfg=reloaded_cfg, device=device),
                      fp32_bytes=state_dict_bytes(payload["state_dict"]),
                      quantized_bytes=state_dict_bytes(reloaded.state_dict()),
                      details={"round_trip_max_abs_diff": round_trip})


def _quantize_onnx(*, module: Any, config: Any, job: Job, payload: Dict[str, Any], model: torch.nn.Module,
                   model_cfg: Any, chosen: Dict, device: torch.device, batches: List[torch.Tensor],
                   record: QuantizationRecord, size: Tuple[int, int]) -> _Quantized:
    """Export the fp32 model at ``size`` (dynamic batch), quantize the graph, record the model and the
    quantization in the ONNX metadata. The fp32 export is only the reference of the comparison."""
    import onnx

    from ..quantization.modelopt_onnx import quantize_onnx

    artifact = job.results_dir / results.quantized_name("modelopt.onnx", "onnx")
    wrapped = InferenceModel(model, mode=model_cfg.mode, topk=model_cfg.test_topk_per_image).eval()
    model_record = ModelRecord(mode=model_cfg.mode, num_classes=int(model_cfg.sem_seg_head.num_classes),
                               topk=int(model_cfg.test_topk_per_image), model_config=payload.get("model_config") or {},
                               label_map=payload.get("label_map"), contiguous_id=bool(payload.get("contiguous_id")))
    with tempfile.TemporaryDirectory(dir=job.results_dir, prefix=".quantize-") as work:
        fp32_path, staged = Path(work) / "fp32.onnx", Path(work) / artifact.name
        job.status.running(f"exporting the fp32 model to ONNX at {size[0]}x{size[1]}")
        graph = export_onnx(wrapped, fp32_path, output_names=wrapped.output_names, input_height=size[0],
                            input_width=size[1], batch_size=-1, record=model_record)
        try:
            details = quantize_onnx(fp32_path, staged, chosen=chosen, calibration=torch.cat(batches).numpy(),
                                    input_name=graph.input_name, algorithm=config.quantize.algorithm, moq=module,
                                    backend_kwargs=config.quantize.backend_kwargs)
        except ValueError as exc:
            raise ActionError(str(exc)) from exc
        quantized = onnx.load(str(staged))
        write_record(quantized, model_record)
        entry = quantized.metadata_props.add()
        entry.key, entry.value = "mask2former.quantization", json.dumps(record.to_dict())
        onnx.save(quantized, str(staged))
        quantized_bytes = staged.stat().st_size
        publish_model_file(staged, artifact, encryption_key=config.encryption_key)
        reference = OnnxRunner(fp32_path, device=device)  # onnxruntime holds the model: the file may go
        fp32_bytes = fp32_path.stat().st_size
    return _Quantized(artifact=artifact, reference=reference,
                      quantized=OnnxRunner(artifact, device=device, encryption_key=config.encryption_key),
                      fp32_bytes=fp32_bytes, quantized_bytes=quantized_bytes, details=details)


def _versions(backend: str) -> Dict[str, str]:
    package = "torchao" if backend == "torchao" else "nvidia-modelopt"
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"torch": str(torch.__version__), package: str(version)}


@reports_resource_failures("quantize")
def run(config: Any, job: Job) -> ActionResult:
    section = config.quantize
    backend = section.backend
    module = require_backend(backend)  # first: a missing package fails before anything is read
    device = quantize_device(section.device)
    if backend == "modelopt.onnx" and section.mode != "static_ptq":
        raise ActionError("quantize.backend modelopt.onnx makes calibrated Q/DQ models only: set quantize.mode to "
                          "static_ptq and dataset.quant_calibration_dataset.images_dir.")
    parent = resolve_model_file("quantize.model_path", section.model_path)
    require_model_key(parent, config.encryption_key)
    try:
        payload = read_checkpoint(parent, encryption_key=config.encryption_key,
                                  tao_contiguous_id=config.dataset.contiguous_id)
        model, model_cfg = build_model_from_checkpoint(payload, config.model)
    except CheckpointError as exc:
        raise ActionError(str(exc)) from exc
    static = section.mode == "static_ptq"
    try:
        rules = rules_from_config(section.layers)
        check_patterns_match(model, layers=rules, skip_names=section.skip_names)
    except ValueError as exc:
        raise ActionError(str(exc)) from exc
    types = (torch.nn.Linear,) if backend == "torchao" else CANDIDATE_TYPES
    chosen = select_modules(model, layers=rules, skip_names=section.skip_names, static=static, types=types)
    if not chosen:
        raise ActionError("quantize.layers and quantize.skip_names leave no layer to quantize.")
    size = quant_input_size(config.dataset)
    batches = calibration_batches(config, size=size) if static or backend == "modelopt.onnx" else None
    record = QuantizationRecord(backend=backend, mode=section.mode, algorithm=section.algorithm,
                                layers=rules_to_dicts(rules), skip_names=list(section.skip_names),
                                modules=modules_dict(chosen), versions=_versions(backend))
    job.status.running(f"quantizing {len(chosen)} layers with {backend} ({section.mode})")
    if backend == "modelopt.onnx":
        outcome = _quantize_onnx(module=module, config=config, job=job, payload=payload, model=model,
                                 model_cfg=model_cfg, chosen=chosen, device=device, batches=batches, record=record,
                                 size=size)
    else:
        outcome = _quantize_pytorch(backend=backend, module=module, config=config, job=job, payload=payload,
                                    model=model, model_cfg=model_cfg, chosen=chosen, device=device, batches=batches,
                                    record=record)
    report = _compare(config=config, job=job, outcome=outcome, model_cfg=model_cfg, size=size)
    report.update(backend=backend, mode=section.mode, algorithm=section.algorithm, device=str(device),
                  parent_checkpoint=str(parent), artifact=str(outcome.artifact), details=outcome.details,
                  selection=summary(chosen, model, types), calibration_images=sum(len(b) for b in batches or []),
                  record=record.to_dict())
    results.write_json(job.results_dir / REPORT_FILE, report)
    return _result(report, outcome)


def _compare(*, config: Any, job: Job, outcome: _Quantized, model_cfg: Any, size: Tuple[int, int]) -> Dict[str, Any]:
    inputs = sample_inputs(batch=1, channels=3, height=size[0], width=size[1], count=LATENCY_RUNS, seed=1)
    job.status.running("measuring latency")
    latency: Dict[str, Any] = compare_latency(outcome.reference, outcome.quantized, inputs)
    latency.update(input_size=list(size), runs=LATENCY_RUNS)
    latency["speedup"] = latency["fp32_ms"] / latency["quantized_ms"] if latency["quantized_ms"] else None
    size_report = {"fp32_bytes": outcome.fp32_bytes, "quantized_bytes": outcome.quantized_bytes,
                   "ratio": outcome.quantized_bytes / outcome.fp32_bytes, "artifact_bytes": outcome.artifact.stat().st_size}
    eval_config = copy.deepcopy(config)
    eval_config.model = model_cfg
    dataset = _val_dataset(eval_config)
    if dataset is None:
        accuracy: Dict[str, Any] = {"skipped": "dataset.val is not set, so accuracy was not measured"}
    else:
        job.status.running(f"evaluating the fp32 and the quantized model on {len(dataset)} dataset.val images")
        fp32 = accuracy_summary(evaluate_on_val(outcome.reference, config=eval_config, dataset=dataset))
        quantized = accuracy_summary(evaluate_on_val(outcome.quantized, config=eval_config, dataset=dataset))
        accuracy = {"fp32": fp32, "quantized": quantized, "drop": accuracy_drop(fp32, quantized),
                    "num_images": len(dataset)}
    return {"size": size_report, "latency": latency, "accuracy": accuracy}


def _result(report: Dict[str, Any], outcome: _Quantized) -> ActionResult:
    metrics: Dict[str, Any] = {"size_ratio": report["size"]["ratio"], "fp32_bytes": report["size"]["fp32_bytes"],
                               "quantized_bytes": report["size"]["quantized_bytes"],
                               "latency_fp32_ms": report["latency"]["fp32_ms"],
                               "latency_quantized_ms": report["latency"]["quantized_ms"]}
    kpi: Dict[str, float] = {"size_ratio": report["size"]["ratio"]}
    accuracy = report["accuracy"]
    for key, value in accuracy.get("quantized", {}).items():
        metrics[key] = value
        metrics[f"{key}_fp32"] = accuracy["fp32"].get(key)
        if key in accuracy["drop"]:
            metrics[f"{key}_drop"] = accuracy["drop"][key]
    for key in ("mIoU", "PQ"):
        if metrics.get(key) is not None:
            kpi[key] = metrics[key]
    drop = accuracy.get("drop", {}).get("mIoU")
    message = (f"{outcome.artifact.name}: {report['size']['ratio']:.0%} of the fp32 size, "
               f"{report['latency']['quantized_ms']:.1f} ms vs {report['latency']['fp32_ms']:.1f} ms per image"
               + (f", mIoU drop {drop:.2f} points" if drop is not None else ""))
    return ActionResult(message=message, metrics=metrics, kpi=kpi,
                        artifacts={"quantized": str(outcome.artifact), "report": str(outcome.artifact.parent / REPORT_FILE)})
