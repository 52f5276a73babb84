"""Whether a job goes through AutoML: the model's policy, a per-run override, and what makes it runnable.

The model-level policy is ``automl_policy`` in ``specs/skill_info.yaml`` (``auto`` or ``off``). A run
may override it (operator argument or DAG param ``automl_policy``); the override is applied to that
run only and never written back to the metadata file. Only ``train`` goes through AutoML.

AutoML reads its search space from the generated train schema and needs the train template; when
either is missing the policy may be ``auto`` but the search is not runnable, and the job trains
directly with a reason that names the missing files and the command that generates them.

No torch, no optuna, no Airflow import: operators call this at execute time and tests at will.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

POLICIES = ("auto", "off")
DEFAULT_POLICY = "auto"
SKILL_INFO_FILE = "specs/skill_info.yaml"
TRAIN_SCHEMA_FILE = "schemas/train.schema.json"
TRAIN_TEMPLATE_FILE = "specs/spec_template_train.yaml"
GENERATE_COMMAND = "python -m mask2former schemas"
AUTOML_ACTION = "train"

PathLike = Union[str, Path]


class AutoMLConfigError(ValueError):
    """An AutoML setting or metadata file that cannot be used; the message names it and what is allowed."""


def repo_root() -> Path:
    """The folder holding ``schemas/`` and ``specs/`` next to the engine package."""
    return Path(__file__).resolve().parents[2]


def read_skill_info(root: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
    """``specs/skill_info.yaml`` under ``root`` as a dict, or None when the file does not exist."""
    path = Path(root or repo_root()) / SKILL_INFO_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AutoMLConfigError(f"{path} is not valid YAML ({exc}); regenerate it with `{GENERATE_COMMAND}`.") \
            from None
    if not isinstance(data, dict):
        raise AutoMLConfigError(f"{path} must hold a mapping (automl_policy, automl_default_parameters, ...); "
                                f"regenerate it with `{GENERATE_COMMAND}`.")
    return data


def read_train_schema(root: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
    """``schemas/train.schema.json`` under ``root``, or None when the file does not exist."""
    path = Path(root or repo_root()) / TRAIN_SCHEMA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AutoMLConfigError(f"{path} is not valid JSON ({exc}); regenerate it with `{GENERATE_COMMAND}`.") \
            from None


def check_policy(value: Any, *, where: str) -> str:
    """``value`` as a policy name, or :class:`AutoMLConfigError` naming ``where`` it came from.

    YAML 1.1 reads an unquoted ``off`` (or ``on``) as a boolean, so false means off and true means auto.
    """
    if isinstance(value, bool):
        return "auto" if value else "off"
    if isinstance(value, str) and value.strip().lower() in POLICIES:
        return value.strip().lower()
    raise AutoMLConfigError(f"{where}: automl_policy {value!r} is not one of {', '.join(POLICIES)}.")


def missing_files(root: Optional[PathLike] = None) -> list:
    """The generated files AutoML needs that ``root`` lacks (relative paths)."""
    base = Path(root or repo_root())
    return [rel for rel in (TRAIN_SCHEMA_FILE, TRAIN_TEMPLATE_FILE, SKILL_INFO_FILE) if not (base / rel).is_file()]


@dataclass(frozen=True)
class PolicyDecision:
    """What a job does: ``use_automl`` with the effective ``policy``, where it came from and why."""

    action: str
    policy: str
    source: str  # "run" (per-run override), "skill_info" (the model metadata) or "default"
    use_automl: bool
    runnable: bool
    reason: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def decide(action: str, override: Optional[str] = None, root: Optional[PathLike] = None) -> PolicyDecision:
    """Whether ``action`` runs through AutoML for this run.

    ``override`` (``auto``/``off``, or None/"" for "use the model's policy") wins over
    ``automl_policy`` of ``specs/skill_info.yaml``; the file itself is only read.
    """
    base = Path(root or repo_root())
    info = read_skill_info(base)
    if override not in (None, ""):
        policy, source = check_policy(override, where="per-run override"), "run"
    elif info is not None and "automl_policy" in info:
        policy, source = check_policy(info["automl_policy"], where=str(base / SKILL_INFO_FILE)), "skill_info"
    else:
        policy, source = DEFAULT_POLICY, "default"
    if action != AUTOML_ACTION:
        return PolicyDecision(action, policy, source, False, False,
                              f"{action} never goes through AutoML (only {AUTOML_ACTION} does).")
    if policy == "off":
        origin = "this run's override" if source == "run" else f"{SKILL_INFO_FILE}"
        return PolicyDecision(action, policy, source, False, not missing_files(base),
                              f"AutoML is off ({origin}): training directly.")
    if info is not None and info.get("automl_enabled") is False:
        return PolicyDecision(action, policy, source, False, False,
                              f"AutoML is disabled for this model (automl_enabled false in {SKILL_INFO_FILE}): "
                              "training directly.")
    missing = missing_files(base)
    if missing:
        return PolicyDecision(action, policy, source, False, False,
                              f"AutoML is enabled (policy auto) but not runnable until the schemas are generated "
                              f"(`{GENERATE_COMMAND}`): {', '.join(missing)} missing under {base}; training "
                              "directly.")
    return PolicyDecision(action, policy, source, True, True, "AutoML is on (policy auto): training goes through "
                                                              "a hyper-parameter search.")
