"""The whole spec and which sections each action reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .actions import EvaluateConfig, ExportConfig, GenTrtEngineConfig, InferenceConfig, QuantizeConfig
from .dataset import DatasetConfig
from .fields import section, spec_field
from .model import ModelConfig
from .train import MlflowConfig, TrainConfig, WandbConfig

ACTIONS = ("train", "evaluate", "inference", "export", "quantize", "gen_trt_engine")

# Top-level keys every action reads besides its sections.
COMMON_KEYS = ("results_dir", "encryption_key", "model_name")

# The sections an action reads. A key of another section is refused for that action, so no key
# in a spec is silently ignored.
ACTION_SECTIONS = {
    "train": ("model", "dataset", "train", "wandb", "mlflow"),
    "evaluate": ("model", "dataset", "evaluate"),
    "inference": ("model", "dataset", "inference"),
    "export": ("model", "export", "mlflow"),
    "quantize": ("model", "dataset", "quantize"),
    "gen_trt_engine": ("gen_trt_engine",),
}

ACTION_DESCRIPTIONS = {
    "train": "Train a Mask2Former model; checkpoints, validation metrics and the best epoch by mIoU.",
    "evaluate": "Score a model (checkpoint, ONNX, TensorRT engine or quantized) or predictions on disk: mIoU, "
                "PQ and mask AP at each image's original size.",
    "inference": "Segment a folder or archive of images: panoptic PNG + JSON, COCO instance results, semantic "
                 "PNGs and overlays.",
    "export": "Export a checkpoint to ONNX and prove onnxruntime matches PyTorch.",
    "quantize": "Post-training quantization (torchao int8 weight-only, ModelOpt int8/fp8) with an accuracy, "
                "size and latency report.",
    "gen_trt_engine": "Build a TensorRT engine from the ONNX model (CUDA GPU) and check it against onnxruntime.",
}


@dataclass
class ExperimentConfig:
    results_dir: Optional[str] = spec_field(
        None, description="Results folder of this job (the CLI creates a new one when null).", nullable=True)
    encryption_key: Optional[str] = spec_field(
        None, description="Passphrase that encrypts the models this job writes and decrypts the encrypted models it "
                          "reads (prefer the environment variable MASK2FORMER_ENCRYPTION_KEY); never written to "
                          "experiment.yaml.", nullable=True, secret=True)
    model_name: str = spec_field("mask2former", description="Network family.", enum=["mask2former"],
                                 no_effect="this tool runs Mask2Former only.")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging of training (Lightning's WandbLogger).")
    mlflow: MlflowConfig = section(MlflowConfig, "MLflow experiment tracking of training and export (Lightning's "
                                                 "MLFlowLogger); off unless a tracking URI is given.")
    model: ModelConfig = section(ModelConfig, "Model architecture, loss and post-processing.")
    dataset: DatasetConfig = section(DatasetConfig, "Data, label map and augmentation.")
    train: TrainConfig = section(TrainConfig, "Training.")
    evaluate: EvaluateConfig = section(EvaluateConfig, "Evaluation.")
    inference: InferenceConfig = section(InferenceConfig, "Inference.")
    export: ExportConfig = section(ExportConfig, "ONNX export.")
    quantize: QuantizeConfig = section(QuantizeConfig, "Post-training quantization.")
    gen_trt_engine: GenTrtEngineConfig = section(GenTrtEngineConfig, "TensorRT engine generation.")
