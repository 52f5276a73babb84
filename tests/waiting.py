"""Polling for a condition in tests that drive real processes (schedulers, triggerers, job processes)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """The first truthy value of ``condition()``, polled every ``poll`` seconds; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} after {timeout} s")
