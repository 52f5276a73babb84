"""The ``wandb`` section as Lightning's WandbLogger (Weights & Biases logging of training).

``WANDB_MODE=offline`` keeps the run on disk under the job's ``logs/wandb`` folder; the API key, when a
run goes online, comes from W&B's own environment (``WANDB_API_KEY``) and never from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def wandb_logger(wandb_cfg: Any, *, save_dir: Path) -> Optional[Any]:
    """A WandbLogger for ``wandb.enable: true`` (None otherwise); the spec's empty strings mean W&B's defaults."""
    if not wandb_cfg.enable:
        return None
    from pytorch_lightning.loggers import WandbLogger

    save_dir.mkdir(parents=True, exist_ok=True)
    settings = {"reinit": wandb_cfg.reinit, "sync_tensorboard": wandb_cfg.sync_tensorboard,
                "save_code": wandb_cfg.save_code, "tags": list(wandb_cfg.tags)}
    optional = {"entity": wandb_cfg.entity, "group": wandb_cfg.group, "id": wandb_cfg.run_id}
    settings.update({k: v for k, v in optional.items() if v})
    if wandb_cfg.run_id:
        settings["resume"] = "allow"
    return WandbLogger(project=wandb_cfg.project, name=wandb_cfg.name, save_dir=str(save_dir), **settings)
