"""gen_trt_engine: ONNX -> TensorRT engine (CUDA GPU) -> proof that the engine matches onnxruntime.

Order: the GPU and the tensorrt package are checked first, so a CPU machine fails at once with one
sentence; then the build plan (mask2former.tensorrt.plan), the build (mask2former.tensorrt.builder), and
a parity check of the engine against onnxruntime on sample inputs. The engine is built under a hidden
name and becomes ``model.engine`` (or ``gen_trt_engine.trt_engine``) only after the parity check passed;
``engine_report.json`` is written either way.

Encryption: with ``encryption_key`` an encrypted ONNX model is read in memory (a missing or wrong key is
refused right after the GPU check, before the model is parsed) and the engine is written encrypted; the
TensorRT runtime deserializes it from bytes decrypted in memory (see mask2former.tensorrt.builder).
Running out of memory or disk ends with FAILURE naming the keys that help.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import results
from ..checkpoint import CheckpointError, read_model_bytes
from ..export.parity import check_parity, sample_inputs
from ..runtime.onnx_runner import OnnxRunner
from ..runtime.tensorrt_runner import TensorRTRunner
from ..tensorrt.builder import EngineBuildError, build_device, build_engine, require_tensorrt
from ..tensorrt.plan import BuildPlan, PlanError, make_build_plan
from .job import ActionError, ActionResult, Job
from ..model_files import require_model_key, resolve_model_file
from .resource_failures import reports_resource_failures

REPORT_FILE = "engine_report.json"
PARITY_BATCHES = 2
PARITY_SEED = 0




def plan_for(config: Any, job: Job, *, onnx_file: Path) -> BuildPlan:
    """The build plan of ``onnx_file`` (its graph read in memory, decrypted when it is encrypted)."""
    section = config.gen_trt_engine
    target = Path(section.trt_engine) if section.trt_engine else job.results_dir / results.ENGINE_FILE
    try:
        graph = onnx.load_model_from_string(read_model_bytes(onnx_file, config.encryption_key))
    except CheckpointError as exc:
        raise ActionError(str(exc)) from None
    try:
        return make_build_plan(section, onnx_file=onnx_file, engine_file=target, onnx_model=graph)
    except PlanError as exc:
        raise ActionError(str(exc)) from exc


@reports_resource_failures("gen_trt_engine")
def run(config: Any, job: Job) -> ActionResult:
    trt = require_tensorrt()  # first: a CPU machine stops here, before anything is read
    onnx_file = resolve_model_file("gen_trt_engine.onnx_file", config.gen_trt_engine.onnx_file, "onnx")
    require_model_key(onnx_file, config.encryption_key)
    device = build_device(config.gen_trt_engine.gpu_id)
    plan = plan_for(config, job, onnx_file=onnx_file)
    target = Path(plan.engine_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}-build-") as work:
        built = Path(work) / target.name
        job.status.running(f"building a {plan.precision} engine for {plan.profile.max[2]}x{plan.profile.max[3]} "
                           f"inputs, batch {plan.profile.min[0]}..{plan.profile.max[0]}")
        try:
            with torch.cuda.device(device):  # TensorRT builds on the current device
                outcome = build_engine(plan, trt=trt, engine_file=str(built), verbose=config.gen_trt_engine.verbose,
                                       encryption_key=config.encryption_key)
        except EngineBuildError as exc:
            raise ActionError(str(exc)) from exc
        job.status.running("checking the engine against onnxruntime")
        engine = TensorRTRunner(built, device=device, trt=trt, encryption_key=config.encryption_key)
        # fp32 reference on the CPU: onnxruntime's CUDA provider may use TF32, which the FP32 engine does not
        reference = OnnxRunner(plan.onnx_file, device="cpu", encryption_key=config.encryption_key)
        inputs = sample_inputs(batch=plan.parity_batch, channels=plan.profile.max[1], height=plan.profile.max[2],
                               width=plan.profile.max[3], count=PARITY_BATCHES, seed=PARITY_SEED)
        parity = check_parity(reference, engine, inputs, tolerance=plan.parity_tolerance, gated=plan.parity_gated)
        report = {"plan": plan.to_dict(), "build": outcome.to_dict(), "parity": parity.to_dict(),
                  "reference": {"runtime": "onnxruntime", "providers": reference.providers},
                  "written": parity.passed, "trt_engine": str(target)}
        results.write_json(job.results_dir / REPORT_FILE, report)
        if not parity.passed:
            raise ActionError(f"The TensorRT engine does not match onnxruntime: {parity.describe_failure()}; no engine "
                              f"was written, see {REPORT_FILE}.")
        built.replace(target)
    metrics = {"parity_max_abs_diff": parity.max_abs_diff, "parity_tolerance": parity.tolerance,
               "engine_bytes": outcome.engine_bytes, "build_seconds": outcome.seconds, "precision": plan.precision}
    return ActionResult(message=f"built {target.name} ({plan.precision}, batch {plan.profile.min[0]}.."
                                f"{plan.profile.max[0]}); matches onnxruntime within {parity.max_abs_diff:.2g}",
                        metrics=metrics, kpi={"parity_max_abs_diff": parity.max_abs_diff},
                        artifacts={"engine": str(target)})
