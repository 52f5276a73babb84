"""GPUs: whether this worker has a CUDA GPU (asked without importing torch: nvidia-smi in a subprocess), and
where the stages that want one are routed (queue and pool, from the environment or Airflow Variables)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional

NVIDIA_SMI_TIMEOUT_S = 30


def cuda_gpu_missing_reason() -> Optional[str]:
    """None when ``nvidia-smi -L`` lists a GPU, else why not (a short clause for a skip message)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi is not on PATH"
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi could not run: {type(exc).__name__}"
    if listing.returncode != 0 or "GPU " not in listing.stdout:
        return "nvidia-smi lists no GPU"
    return None


# ----------------------------------------------------------------------------- routing of GPU stages

#: Setting -> (environment variable, Airflow Variable, default). The environment wins over the Variable.
ROUTING_SETTINGS = {
    "workers": ("MASK2FORMER_GPU_WORKERS", "mask2former_gpu_workers", "false"),
    "queue": ("MASK2FORMER_GPU_QUEUE", "mask2former_gpu_queue", "gpu"),
    "pool": ("MASK2FORMER_GPU_POOL", "mask2former_gpu_pool", "mask2former_gpu"),
}
_TRUE = ("1", "true", "yes", "on")


def _setting(name: str) -> str:
    env, variable, default = ROUTING_SETTINGS[name]
    value = os.environ.get(env)
    if value:
        return value.strip()
    try:
        from airflow.sdk import Variable

        value = Variable.get(variable, default=None)
    except Exception:  # noqa: BLE001 - no metadata database or API server reachable at parse: the default
        value = None
    return str(value).strip() if value else default


@dataclass(frozen=True)
class GpuRouting:
    """Where the stages that want a GPU run: the GPU queue and pool when the deployment has GPU workers."""

    has_gpu_workers: bool
    queue: str
    pool: str

    def task_arguments(self) -> Dict[str, str]:
        """``queue``/``pool`` arguments of a GPU stage ({} without GPU workers: the default queue and pool)."""
        return {"queue": self.queue, "pool": self.pool} if self.has_gpu_workers else {}


@lru_cache(maxsize=1)
def gpu_routing() -> GpuRouting:
    """The deployment's routing, read once per DAG parse from env (``MASK2FORMER_GPU_WORKERS``,
    ``MASK2FORMER_GPU_QUEUE``, ``MASK2FORMER_GPU_POOL``) or the Variables of the same names in lower case."""
    return GpuRouting(has_gpu_workers=_setting("workers").lower() in _TRUE, queue=_setting("queue"),
                      pool=_setting("pool"))
