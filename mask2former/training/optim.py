"""Optimiser and learning-rate schedule of training (the `train.optim` section).

Parameter groups (AdamW, betas (momentum, 0.999)):

* backbone parameters (names under ``backbone.``) train at ``lr * backbone_multiplier``, the rest at ``lr``;
* no weight decay on normalisation layers (their weights and biases), on embeddings (``nn.Embedding``
  modules such as the decoder's query features / query positions / level embeddings, and the parameters
  named ``absolute_pos_embed``, ``level_embed``, ``query_feat``, ``query_embed``) and on Swin's
  ``relative_position_bias_table``; every other parameter decays with ``weight_decay``.
* frozen parameters (``requires_grad`` False) are left out.

Schedules are multipliers of each group's base lr, evaluated at the optimizer step (0-based) and stepped
once per optimizer step: a linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters`` steps, times
either MultiStep (``gamma`` per milestone; milestones are EPOCHS, converted with the steps per epoch, see
:func:`milestone_steps` for TAO's default in a short run) or WarmupPoly (``(1 - step / total_steps) **
poly_power``, reaching 0 at the last step).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

BACKBONE_PREFIX = "backbone."
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm)
NO_DECAY_NAMES = frozenset({"relative_position_bias_table", "absolute_pos_embed", "level_embed", "query_feat",
                            "query_embed"})
SCHEDULERS = ("MultiStep", "WarmupPoly")
TAO_DEFAULT_MILESTONES = (88, 96)  # epochs of TAO's 100-epoch reference schedule


@dataclass(frozen=True)
class ParamGroupInfo:
    """Which group a parameter falls in: backbone or not, decayed or not."""

    backbone: bool
    decay: bool

    @property
    def name(self) -> str:
        return f"{'backbone' if self.backbone else 'head'}_{'decay' if self.decay else 'no_decay'}"


def _no_decay_parameter_names(model: nn.Module) -> set:
    """Full names of the parameters that must not decay (norms, embeddings, position tables)."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        whole_module = isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding)
        for param_name, _ in module.named_parameters(recurse=False):
            if whole_module or param_name in NO_DECAY_NAMES:
                names.add(prefix + param_name)
    return names


def classify_parameters(model: nn.Module, backbone_prefix: str = BACKBONE_PREFIX) -> Dict[str, ParamGroupInfo]:
    """Group of every trainable parameter, by full parameter name (``backbone_prefix`` starts the backbone's
    names: this project's networks use the default; bench/ maps the Hugging Face port's)."""
    no_decay = _no_decay_parameter_names(model)
    return {name: ParamGroupInfo(backbone=name.startswith(backbone_prefix), decay=name not in no_decay)
            for name, param in model.named_parameters() if param.requires_grad}


def build_param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_multiplier: float,
                       backbone_prefix: str = BACKBONE_PREFIX) -> List[Dict[str, Any]]:
    """AdamW parameter groups (non-empty ones only), each with "name", "lr", "weight_decay", "params"."""
    params = dict(model.named_parameters())
    buckets: Dict[ParamGroupInfo, List[torch.nn.Parameter]] = {}
    for name, info in classify_parameters(model, backbone_prefix).items():
        buckets.setdefault(info, []).append(params[name])
    groups = []
    for info in sorted(buckets, key=lambda i: (not i.backbone, not i.decay)):
        groups.append({"name": info.name, "params": buckets[info],
                       "lr": lr * (backbone_multiplier if info.backbone else 1.0),
                       "weight_decay": weight_decay if info.decay else 0.0})
    if not groups:
        raise ValueError("no trainable parameters: train.freeze froze the whole model")
    return groups


FUSED_DEVICE_TYPES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, optim_cfg: Any, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` with betas (optim.momentum, 0.999).

    ``fused`` asks for torch's fused kernel (one pass over every parameter instead of a dozen elementwise ops
    per tensor; a quarter of the optimizer time on CPU, see bench/bench_training_step.py); it is used where
    every trainable parameter is a float tensor on CPU or CUDA, and the plain implementation elsewhere."""
    if optim_cfg.type != "AdamW":
        raise ValueError(f"train.optim.type {optim_cfg.type!r} is not supported; expected 'AdamW'")
    groups = build_param_groups(model, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                backbone_multiplier=optim_cfg.backbone_multiplier)
    params = [p for group in groups for p in group["params"]]
    fused = fused and all(p.is_floating_point() and p.device.type in FUSED_DEVICE_TYPES for p in params)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.momentum, 0.999),
                             weight_decay=optim_cfg.weight_decay, fused=fused or None)


def warmup_multiplier(step: int, *, warmup_iters: int, warmup_factor: float) -> float:
    """Linear ramp from warmup_factor at step 0 to 1 at step warmup_iters; 1 afterwards."""
    if step >= warmup_iters:
        return 1.0
    alpha = step / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def milestone_steps(milestones: Sequence[int], *, steps_per_epoch: int, total_steps: int) -> List[int]:
    """Optimizer steps at which MultiStep multiplies the rate by gamma: each milestone epoch's first step.

    TAO's default milestones [88, 96] belong to a 100-epoch schedule. In a run shorter than 88 epochs (TAO's
    default num_epochs is 10) none of them is reached, so the rate would stay constant to the last step and
    the run would end noisy (BENCHMARKS.md, convergence race). Such a run decays at the same fractions of its own length instead: 88 % and 96 % of its steps.
    Any other milestones, and the default in a run long enough to reach them, act as written.
    """
    steps = [m * steps_per_epoch for m in milestones]
    if tuple(milestones) == TAO_DEFAULT_MILESTONES and steps[0] >= total_steps:
        steps = [max(1, round(total_steps * m / 100)) for m in milestones]
    return steps


def lr_multiplier_fn(*, scheduler: str, total_steps: int, steps_per_epoch: int, milestones: Sequence[int],
                     gamma: float, warmup_iters: int, warmup_factor: float,
                     poly_power: float) -> Callable[[int], float]:
    """The base-lr multiplier as a function of the optimizer step (what LambdaLR takes).

    Returned as a closure on purpose: LambdaLR saves the state of callable OBJECTS in its state_dict and
    would restore an old schedule on resume; a closure is rebuilt from the current spec (a resumed run
    with more epochs stretches WarmupPoly over the new total) while the step count comes from the
    checkpoint.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"train.optim.lr_scheduler {scheduler!r} is not one of {list(SCHEDULERS)}")
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"total_steps ({total_steps}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    decays = milestone_steps(milestones, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    def multiplier(step: int) -> float:
        warm = warmup_multiplier(step, warmup_iters=warmup_iters, warmup_factor=warmup_factor)
        if scheduler == "MultiStep":
            return warm * gamma ** bisect.bisect_right(decays, step)
        progress = min(step, total_steps) / total_steps
        return warm * (1.0 - progress) ** poly_power

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, *, total_steps: int,
                    steps_per_epoch: int) -> LambdaLR:
    """LambdaLR applying :func:`lr_multiplier_fn` to every group; step it after each optimizer step."""
    fn = lr_multiplier_fn(scheduler=optim_cfg.lr_scheduler, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, milestones=list(optim_cfg.milestones),
                          gamma=optim_cfg.gamma, warmup_iters=optim_cfg.warmup_iters,
                          warmup_factor=optim_cfg.warmup_factor, poly_power=optim_cfg.poly_power)
    return LambdaLR(optimizer, lr_lambda=fn)
