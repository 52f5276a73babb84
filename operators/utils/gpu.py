"""Whether this worker has a CUDA GPU, asked without importing torch (nvidia-smi in a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Optional

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
