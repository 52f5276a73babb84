"""The engine's actions. Each is a module ``mask2former.actions.<name>`` with ``run(config, job)``.

An action is offered by the CLI only when its module exists, so the CLI never advertises an action
that does nothing.
"""

from __future__ import annotations

import importlib.util
from typing import List

from ..config import ACTIONS


def module_name(action: str) -> str:
    return f"{__name__}.{action}"


def available_actions() -> List[str]:
    return [a for a in ACTIONS if importlib.util.find_spec(module_name(a)) is not None]
