"""Airflow operators for the Mask2Former engine (one per action), their launchers and the job link.

Importing this package is light (no Airflow, no torch until a name below is used), so the
Kubernetes pod entry point ``python -m operators.pod_job`` runs without Airflow's import cost::

    from operators import Mask2FormerTrainOperator, KubernetesPodLauncher
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Mask2FormerBaseOperator": "base",
    "Mask2FormerTrainOperator": "mask2former_operators",
    "Mask2FormerEvaluateOperator": "mask2former_operators",
    "Mask2FormerInferenceOperator": "mask2former_operators",
    "Mask2FormerExportOperator": "mask2former_operators",
    "Mask2FormerQuantizeOperator": "mask2former_operators",
    "Mask2FormerGenTrtEngineOperator": "mask2former_operators",
    "LocalProcessLauncher": "launchers",
    "KubernetesPodLauncher": "launchers",
    "Mask2FormerJobLink": "links",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
