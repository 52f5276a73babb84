"""Airflow operators for the Mask2Former engine, laid out by role like an Airflow provider.

* ``hooks/storage.py``: :class:`Mask2FormerStorageHook`, every call to where datasets and results live;
* ``operators/``: one operator per engine action (``actions.py``), their base (``base.py``) and AutoML
  (``automl.py``);
* ``triggers/job.py``: :class:`Mask2FormerJobTrigger`, which a deferred task waits on;
* ``links/job.py``: the task's link to its job page;
* ``launchers.py``: where a job runs (a local process, a Kubernetes pod); ``pod_job.py``: the job entry
  point that runs in either; ``utils/``: job folders, overrides, parent models, outcomes, the encryption key.

Importing this package is light (no Airflow, no torch until a name below is used)::

    from operators import Mask2FormerTrainOperator, KubernetesPodLauncher
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Mask2FormerBaseOperator": "operators.base",
    "Mask2FormerTrainOperator": "operators.actions",
    "Mask2FormerEvaluateOperator": "operators.actions",
    "Mask2FormerInferenceOperator": "operators.actions",
    "Mask2FormerExportOperator": "operators.actions",
    "Mask2FormerQuantizeOperator": "operators.actions",
    "Mask2FormerGenTrtEngineOperator": "operators.actions",
    "Mask2FormerAutoMLOperator": "operators.automl",
    "LocalProcessLauncher": "launchers",
    "KubernetesPodLauncher": "launchers",
    "Mask2FormerJobLink": "links.job",
    "Mask2FormerJobTrigger": "triggers.job",
    "Mask2FormerStorageHook": "hooks.storage",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
