"""The six Mask2Former operators, one per engine action (see :class:`~operators.operators.base.Mask2FormerBaseOperator`)."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowSkipException

from .base import Mask2FormerBaseOperator
from ..utils.gpu import cuda_gpu_missing_reason


class Mask2FormerTrainOperator(Mask2FormerBaseOperator):
    """Train; a retried task resumes from the last checkpoint in its (stable) job folder."""

    action = "train"
    wants_gpu = True


class Mask2FormerEvaluateOperator(Mask2FormerBaseOperator):
    """Evaluate the parent's model (checkpoint, ONNX, TensorRT engine or quantized model): mIoU, PQ, mask AP."""

    action = "evaluate"
    wants_gpu = True


class Mask2FormerInferenceOperator(Mask2FormerBaseOperator):
    """Segment the images of ``eval_dataset`` (or ``dataset.test.img_dir``) with the parent's model."""

    action = "inference"
    wants_gpu = True


class Mask2FormerExportOperator(Mask2FormerBaseOperator):
    """Export the parent's checkpoint to ONNX (parity-checked against PyTorch)."""

    action = "export"


class Mask2FormerQuantizeOperator(Mask2FormerBaseOperator):
    """Post-training quantization of the parent's checkpoint."""

    action = "quantize"
    wants_gpu = True


class Mask2FormerGenTrtEngineOperator(Mask2FormerBaseOperator):
    """Build a TensorRT engine from the parent's ONNX model; skipped on a worker without a CUDA GPU.

    On a deployment with GPU workers it goes to the GPU queue and pool (see :func:`~operators.utils.gpu.gpu_routing`);
    or give it a KubernetesPodLauncher with GPUs.
    """

    action = "gen_trt_engine"
    wants_gpu = True

    def check_can_run(self) -> None:
        if not self.launcher.runs_here:
            return  # a pod asks the cluster for its GPU
        reason = cuda_gpu_missing_reason()
        if reason is not None:
            raise AirflowSkipException(f"gen_trt_engine skipped: building a TensorRT engine needs a CUDA GPU, and "
                                       f"this worker has none: {reason}.")


__all__ = ["Mask2FormerEvaluateOperator", "Mask2FormerExportOperator", "Mask2FormerGenTrtEngineOperator",
           "Mask2FormerInferenceOperator", "Mask2FormerQuantizeOperator", "Mask2FormerTrainOperator"]
