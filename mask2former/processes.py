"""Stopping a job that runs in its own process group (operators, AutoML trials)."""

from __future__ import annotations

import os
import signal
import subprocess


def terminate_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group (the engine then ends status.json with FAILURE), SIGKILL it after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    except ProcessLookupError:
        pass
