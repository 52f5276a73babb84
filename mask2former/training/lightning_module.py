"""The LightningModule of training: model + criterion, optimiser and schedule, validation, checkpoint payload.

Validation under DDP: every rank runs the model and the evaluation host stage (post-processing to the
original image size, raw category ids) on its shard of the validation set (an in-order DistributedSampler
that the data module sets).
Each batch's per-image predictions are gathered to rank 0, which skips the images the sampler repeated to
even out the shards (by image id) and feeds the metric evaluators; rank 0 then computes the metrics and
broadcasts them, so every rank holds the same numbers (checkpoint decisions stay collective). The expensive
part (model, up-sampling, panoptic merge, RLE encoding) runs in parallel; only the counting is central.

Checkpoint payload (see :mod:`mask2former.checkpoint`): Lightning's resume state (optimizer_states,
lr_schedulers, loops, callbacks, ...) plus "format", "state_dict" (the network's weights without prefix),
"model_config", "label_map", "contiguous_id", "epoch" (1-based: the epoch the step belongs to) and
"global_step" (optimizer steps done).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from ..checkpoint import FORMAT
from ..data.label_map import LabelMap
from ..evaluation.pipeline import INSTANCE_KEYS, PANOPTIC_KEYS, SEMANTIC_KEYS, Evaluator
from .optim import build_optimizer, build_scheduler, milestone_steps

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
LOSS_LOG_KEYS = ("loss_ce", "loss_mask", "loss_dice")
SUMMARY_KEYS = SEMANTIC_KEYS + PANOPTIC_KEYS + INSTANCE_KEYS
KPI_KEYS = ("mIoU", "PQ", "AP")


def summary_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The scalar validation numbers (no per-class tables), NaN-free, as floats."""
    out = {}
    for key in SUMMARY_KEYS:
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
    return out


def gather_to_rank_zero(obj: Any) -> Optional[List[Any]]:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None on other ranks; [obj] without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    rank = dist.get_rank()
    received = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, received, dst=0)
    return received


class Mask2FormerModule(pl.LightningModule):
    """Training and validation of a Mask2Former network.

    Args:
        config: the resolved spec (``model`` and ``train`` sections are read).
        model: the network (already initialised from pretrained weights and frozen where asked).
        criterion: the loss (``criterion(outputs, targets)`` -> losses, ``criterion.total_loss``).
        label_map: recorded in checkpoints; None when unknown.
        evaluator_factory: builds the validation evaluator once (mask2former.evaluation.pipeline); None when
            the run has no validation split.
    """

    def __init__(self, *, config: Any, model: nn.Module, criterion: nn.Module, label_map: Optional[LabelMap],
                 evaluator_factory: Optional[Callable[[], Evaluator]]) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.criterion = criterion
        self.label_map = label_map
        self.evaluator_factory = evaluator_factory
        self._evaluator: Optional[Evaluator] = None
        self._seen_image_ids: set = set()
        self._loss_sum = torch.zeros(())
        self._loss_count = 0
        self.last_validation: Optional[Dict[str, Any]] = None  # {"epoch", "global_step", "metrics", "summary"}
        self.last_epoch_loss: Optional[float] = None

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, targets = batch["images"], batch["targets"]
        outputs = self.model(images)
        losses = self.criterion(outputs, targets)
        loss = self.criterion.total_loss(losses)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{key} {float(losses[key]):.4g}" for key in LOSS_LOG_KEYS if key in losses)
            raise FloatingPointError(f"The training loss became {loss.item()} at step {self.global_step} ({terms}); "
                                     "lower train.optim.lr, raise train.optim.warmup_iters or keep "
                                     "train.clip_grad_norm > 0.")
        batch_size = images.shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{key}": losses[key] for key in LOSS_LOG_KEYS if key in losses}, on_step=True,
                      on_epoch=False, batch_size=batch_size)
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_count += 1
        return loss

    def epoch_mean_loss(self) -> float:
        """Mean training loss of the current epoch over every rank's steps (a collective under DDP)."""
        totals = torch.stack([self._loss_sum.to(self.device, torch.float32).reshape(()),
                              torch.tensor(float(self._loss_count), device=self.device)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.last_epoch_loss = float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")
        return self.last_epoch_loss

    def configure_optimizers(self) -> Dict[str, Any]:
        optim_cfg = self.config.train.optim
        # Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales them
        # inside its step, as fused ones do; FSDP's flat parameters keep the implementation it was tested with.
        mixed = "mixed" in str(self.trainer.precision)
        fused = not mixed and not isinstance(self.trainer.strategy, FSDPStrategy)
        optimizer = build_optimizer(self.model, optim_cfg, fused=fused)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, int(self.trainer.max_epochs)))
        if self.config.train.iters_per_epoch:  # TAO's WarmupPoly length: iters_per_epoch * num_epochs steps
            total_steps = self.config.train.iters_per_epoch * self.config.train.num_epochs
        scheduler = build_scheduler(optimizer, optim_cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        if optim_cfg.lr_scheduler == "MultiStep" and self.trainer.is_global_zero:
            decays = milestone_steps(optim_cfg.milestones, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
            if decays != [m * steps_per_epoch for m in optim_cfg.milestones]:
                log.info("train.optim.milestones %s (TAO's default, epochs of a 100-epoch schedule) lie beyond this "
                         "%d-epoch run: the rate decays by gamma at 88 %% and 96 %% of it instead (steps %s of %d)",
                         list(optim_cfg.milestones), self.trainer.max_epochs, decays, total_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip the global L2 gradient norm once per optimizer step (Trainer gradient_clip_val), then, for
        ``train.clip_grad_type: norm``, each parameter's gradient by its ``clip_grad_norm_type`` norm, as TAO
        does. FSDP shards gradients, so it clips through the sharded root module, which computes the norm over
        all shards."""
        if not gradient_clip_val:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)
        if self.config.train.clip_grad_type == "norm":  # TAO's per-parameter clipping, after the global one
            norm_type = float(self.config.train.clip_grad_norm_type)
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        torch.nn.utils.clip_grad_norm_([parameter], gradient_clip_val, norm_type=norm_type)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        if self.evaluator_factory is None:
            raise RuntimeError("validation was scheduled but the module has no evaluator (no validation split)")
        if self._evaluator is None:
            self._evaluator = self.evaluator_factory()
        self._evaluator.reset()
        self._seen_image_ids = set()

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        outputs = self.model(batch["images"])
        raw = {"pred_logits": outputs["pred_logits"].float(), "pred_masks": outputs["pred_masks"].float()}
        predictions = self._evaluator.host(raw, batch["metas"])
        gathered = gather_to_rank_zero(predictions)
        if gathered is None:
            return
        for rank_predictions in gathered:
            for prediction in rank_predictions:
                if prediction.image_id in self._seen_image_ids:
                    continue  # a repeat the distributed sampler added to even out the shards
                self._seen_image_ids.add(prediction.image_id)
                self._evaluator.update(prediction)

    def on_validation_epoch_end(self) -> None:
        metrics = self._evaluator.compute() if self.trainer.is_global_zero else None
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        summary = summary_metrics(metrics)
        self.last_validation = {"epoch": self.current_epoch + 1, "global_step": self.global_step,
                                "metrics": metrics, "summary": summary}
        # every rank holds the same (broadcast) numbers: rank 0 logs them
        self.log_dict({f"val/{key}": value for key, value in summary.items()}, on_epoch=True, rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Turn Lightning's checkpoint into this tool's payload (weights without the "model." prefix)."""
        checkpoint["state_dict"] = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
                                    if key.startswith(MODEL_PREFIX)}
        checkpoint["format"] = FORMAT
        checkpoint["model_config"] = dataclasses.asdict(self.config.model)
        checkpoint["label_map"] = self.label_map.categories() if self.label_map is not None else None
        checkpoint["contiguous_id"] = bool(self.config.dataset.contiguous_id)
        checkpoint["epoch"] = self.current_epoch + 1
        checkpoint["global_step"] = self.global_step

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Give Lightning back the prefixed names it restores the module from."""
        checkpoint["state_dict"] = {MODEL_PREFIX + key: value for key, value in checkpoint["state_dict"].items()}
