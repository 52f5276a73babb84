"""Progress of a long evaluation or inference: RUNNING lines in status.json and the log (at most every
``interval_s`` seconds, and at the end), and a progress bar when stderr is a terminal."""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from typing import Optional

from ..results import StatusWriter


def format_eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(max(0.0, seconds)))))


class ProgressReporter:
    """Call with (done, total) after each batch.

    Args:
        action: the action's name, first word of each message.
        status: the job's status writer.
        log: the job's logger.
        interval_s: least time between two RUNNING lines.
    """

    def __init__(self, *, action: str, status: StatusWriter, log: logging.Logger, interval_s: float = 30.0,
                 what: str = "images") -> None:
        self.action = action
        self.status = status
        self.log = log
        self.interval_s = interval_s
        self.what = what
        self._start = time.monotonic()
        self._last: Optional[float] = None
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=action, unit=what[:-1] if what.endswith("s") else what, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)
        if done < total and self._last is not None and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = now - self._start
        eta = elapsed / done * (total - done) if done else None
        message = f"{self.action}: {done}/{total} {self.what}"
        self.log.info("%s (%.1f s elapsed)", message, elapsed)
        self.status.running(message, eta=format_eta(eta) if eta is not None else None)
        if done >= total and self._bar is not None:
            self._bar.close()
