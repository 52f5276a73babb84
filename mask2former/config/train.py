"""The `train` section: schedule, optimiser, precision, devices, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .fields import section, spec_field


@dataclass
class OptimConfig:
    type: str = spec_field("AdamW", description="Optimiser.", enum=["AdamW"])
    monitor_name: str = spec_field("train_loss", description="Metric a plateau scheduler would watch.",
                                   enum=["train_loss", "val_loss"],
                                   no_effect="MultiStep and WarmupPoly follow the step count, as they do in TAO, "
                                             "where the name only reaches Lightning's scheduler settings.")
    lr: float = spec_field(2e-4, description="Base learning rate.", exclusive_minimum=0, maximum=1,
                           automl_enabled=True, automl_min=1e-6, automl_max=1e-2, automl_log_scale=True,
                           popular=True)
    backbone_multiplier: float = spec_field(0.1, description="Learning-rate factor for the backbone.", minimum=0,
                                            maximum=1, automl_enabled=True, automl_min=0.01, automl_max=1.0)
    weight_decay: float = spec_field(0.05, description="Weight decay (none on norms, embeddings and position "
                                                       "tables).", minimum=0, maximum=1, automl_enabled=True,
                                     automl_min=1e-4, automl_max=0.2, automl_log_scale=True)
    momentum: float = spec_field(0.9, description="AdamW beta1.", minimum=0, maximum=0.999, automl_enabled=True,
                                 automl_min=0.8, automl_max=0.95)
    lr_scheduler: str = spec_field("MultiStep", description="MultiStep: decay by gamma at each milestone epoch; "
                                                            "WarmupPoly: polynomial decay to zero over the run.",
                                   enum=["MultiStep", "WarmupPoly"])
    milestones: List[int] = spec_field([88, 96], description="MultiStep: epochs at which the rate is multiplied by "
                                                             "gamma. TAO's default [88, 96] in a run shorter "
                                                             "than 88 epochs acts at 88 % and 96 % of the run.",
                                       minimum=1)
    gamma: float = spec_field(0.1, description="MultiStep: decay factor.", exclusive_minimum=0, maximum=1)
    warmup_iters: int = spec_field(0, description="Linear warm-up steps from lr * warmup_factor (both schedulers).",
                                   minimum=0)
    warmup_factor: float = spec_field(1e-3, description="Starting fraction of lr during warm-up.", exclusive_minimum=0,
                                      maximum=1)
    poly_power: float = spec_field(0.9, description="WarmupPoly: power of the polynomial decay.",
                                   exclusive_minimum=0)


@dataclass
class CudnnConfig:
    benchmark: bool = spec_field(False, description="torch.backends.cudnn.benchmark: pick the fastest convolution "
                                                    "algorithms for the input sizes seen.")
    deterministic: bool = spec_field(True, description="torch.backends.cudnn.deterministic: deterministic "
                                                       "convolution algorithms.")


@dataclass
class TrainConfig:
    num_gpus: int = spec_field(1, description="GPUs per node (ignored on a CPU-only machine, which trains on CPU "
                                              "processes).", minimum=1)
    gpu_ids: List[int] = spec_field([0], description="GPU indices on this node.", minimum=0)
    num_nodes: int = spec_field(1, description="Nodes (multi-node reads WORLD_SIZE, NODE_RANK, MASTER_ADDR, "
                                               "MASTER_PORT).", minimum=1)
    seed: int = spec_field(1234, description="Random seed.", minimum=0)
    num_epochs: int = spec_field(10, description="Epochs.", minimum=1, popular=True)
    checkpoint_interval: int = spec_field(1, description="Save a checkpoint every N units "
                                                         "(checkpoint_interval_unit).", minimum=1)
    checkpoint_interval_unit: str = spec_field("epoch", description="Unit of checkpoint_interval.",
                                               enum=["epoch", "step"])
    validation_interval: int = spec_field(1, description="Validate every N epochs.", minimum=1)
    resume_training_checkpoint_path: Optional[str] = spec_field(
        None, description="Checkpoint to resume from (default: the latest in results_dir).", nullable=True)
    pretrained_model_path: Optional[str] = spec_field(
        None, description="Start from these weights (a checkpoint of this tool or an imported one; class head "
                          "dropped when num_classes differs): path, file://, s3:// or https://.", nullable=True,
        popular=True)
    pretrained_model_sha256: Optional[str] = spec_field(
        None, description="Expected SHA-256 (64 hex digits) of pretrained_model_path; a download or file that "
                          "differs is refused.", nullable=True)
    freeze: List[str] = spec_field([], description="Parameter-name prefixes to freeze, e.g. ['backbone'].")
    clip_grad_norm: float = spec_field(0.1, description="Clip the global gradient norm (0: off).", minimum=0)
    clip_grad_norm_type: float = spec_field(2.0, description="Norm of the per-parameter clipping of "
                                                             "clip_grad_type norm: 2.0, another p, or inf.",
                                            exclusive_minimum=0)
    clip_grad_type: str = spec_field("full", description="full: clip the L2 norm of all gradients together; "
                                                         "norm: then also each parameter's gradient by its "
                                                         "clip_grad_norm_type norm (as TAO does for any type other "
                                                         "than full).", enum=["full", "norm"])
    is_dry_run: bool = spec_field(False, description="Run one training and one validation batch to check the spec "
                                                     "and data (Lightning's fast_dev_run), writing no checkpoint.")
    activation_checkpoint: bool = spec_field(
        False, description="TAO: DDP without the search for unused parameters.",
        no_effect="DDP here never searches for unused parameters (TAO's behaviour with true); Swin activation "
                  "checkpointing is model.backbone.swin.use_checkpoint.")
    use_distributed_sampler: bool = spec_field(False, description="Lightning's distributed sampler.",
                                               no_effect="the data module shards every split itself.")
    iters_per_epoch: Optional[int] = spec_field(None, description="Steps per epoch the WarmupPoly schedule counts "
                                                                  "(as TAO: decay over iters_per_epoch * num_epochs "
                                                                  "steps; null: the real number of steps).",
                                                minimum=1, nullable=True)
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/train (--results-dir and the operators name the job folder exactly).",
        nullable=True)
    cudnn: CudnnConfig = section(CudnnConfig, "cuDNN settings.")
    precision: str = spec_field("fp32", description="Training precision (bf16/fp16 autocast; the pixel decoder "
                                                    "stays fp32).", enum=["fp32", "fp16", "bf16"])
    distributed_strategy: str = spec_field("ddp", description="Multi-device strategy.", enum=["ddp", "fsdp"])
    recompute_pixel_decoder: bool = spec_field(
        True, description="Recompute the pixel decoder's encoder layers in the backward pass instead of keeping "
                          "their activations (less peak memory for a slightly longer step).")
    optim: OptimConfig = section(OptimConfig, "Optimiser and learning-rate schedule.")


@dataclass
class WandbConfig:
    enable: bool = spec_field(False, description="Log training to Weights & Biases (WANDB_MODE=offline keeps the "
                                                 "run on disk; TAO's default is true).")
    project: str = spec_field("TAO Toolkit", description="W&B project.")
    entity: str = spec_field("", description="W&B entity (team or user; empty: the account's default).")
    group: str = spec_field("", description="W&B run group.")
    tags: List[str] = spec_field(["training", "tao-toolkit"], description="W&B run tags.")
    reinit: bool = spec_field(False, description="Allow several runs in one process.")
    sync_tensorboard: bool = spec_field(False, description="Also sync the TensorBoard logs.")
    save_code: bool = spec_field(False, description="Save the main script with the run.")
    name: str = spec_field("TAO Toolkit training experiment", description="W&B run name.")
    run_id: str = spec_field("", description="W&B run id (empty: a new run; set it to resume a run).")


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = spec_field(
        None, description="MLflow tracking server of this job (train logs params, per-epoch metrics and the best "
                          "checkpoint; export logs the ONNX model into the training run). It wins over the "
                          "environment's MLFLOW_TRACKING_URI (which the operators' mlflow_conn_id sets); null: that "
                          "variable, and no tracking without it. Credentials go in MLflow's own variables "
                          "(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), not in the URI.", nullable=True)
    experiment_name: Optional[str] = spec_field(
        None, description="MLflow experiment of the run; null: the environment's MLFLOW_EXPERIMENT_NAME, else "
                          "mask2former.", nullable=True)
