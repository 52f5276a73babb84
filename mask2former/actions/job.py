"""What an action receives besides its config (the job: folder, status, log) and what it returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import ActionError
from ..results import StatusWriter

__all__ = ["ActionError", "ActionResult", "Job"]


@dataclass
class Job:
    action: str
    results_dir: Path
    status: StatusWriter
    log: logging.Logger


@dataclass
class ActionResult:
    message: str
    metrics: Dict[str, Any] = field(default_factory=dict)
    kpi: Optional[Dict[str, float]] = None
    artifacts: Dict[str, str] = field(default_factory=dict)
