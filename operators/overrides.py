"""Spec overrides as the operators take them: coerced, validated early, split per action.

Operators receive one dict of flat dotted keys (``{"train.num_epochs": 10, "model.mode": "semantic"}``)
and share it across a pipeline, so a key is validated against the action that owns its section
(``export.*`` by export, ``model.*`` and ``dataset.*`` by train, ...) and each action keeps the keys of
the sections it reads. Validation is the engine's own (jsonschema through
:func:`mask2former.config.resolve_spec_dict`): no torch, cheap enough for DAG parsing.

Secret keys (``encryption_key``) are refused, even templated: overrides are stored in the DAG run conf
and in the rendered template fields, where anyone who can read the run sees them. The operators take
the key from an Airflow connection or Variable instead (:mod:`operators.encryption`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Dict

import yaml

from mask2former.config import ACTION_SECTIONS, ACTIONS, SpecError, parse_override_words, resolve_spec_dict
from mask2former.config.schema import secret_keys

OPERATOR_OWNED_KEYS = ("results_dir",)


def is_templated(value: Any) -> bool:
    """Whether a literal still holds Jinja (rendered only at execute time)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def coerce_overrides(value: Any) -> Dict[str, Any]:
    """A dict of dotted overrides from None, a mapping, a JSON/YAML string or ``key=value`` words."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise SpecError(f"spec_overrides: {value!r} is neither JSON nor YAML ({exc}).") from None
        if parsed is None:
            return {}
        if not isinstance(parsed, Mapping):
            raise SpecError(f"spec_overrides must be a mapping of dotted keys to values, got {value!r}.")
        return {str(k): v for k, v in parsed.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value):
        return parse_override_words(list(value))
    raise SpecError(f"spec_overrides must be a mapping of dotted keys (for example {{'train.num_epochs': 10}}), "
                    f"got {type(value).__name__} {value!r}.")


def owner_action(key: str, default: str) -> str:
    """The action that validates ``key``: ``default`` when it reads the key's section, else the first that does."""
    top = key.split(".", 1)[0]
    if top in ACTION_SECTIONS[default]:
        return default
    for action in ACTIONS:
        if top in ACTION_SECTIONS[action]:
            return action
    return default


def validate_overrides(action: str, overrides: Mapping[str, Any], *, skip_templated: bool = False) -> None:
    """Raise :class:`SpecError` for the first unknown key, wrong type, bound or enum in ``overrides``.

    Each key is checked by the action owning its section (so an operator accepts the shared
    overrides of a whole pipeline); a key no action reads is reported against ``action`` with the
    nearest valid keys. ``skip_templated`` leaves out keys and values still holding Jinja.
    """
    groups: Dict[str, Dict[str, Any]] = {}
    refuse_secret_keys(overrides)
    for key, value in overrides.items():
        if skip_templated and (is_templated(key) or _holds_template(value)):
            continue
        if key in OPERATOR_OWNED_KEYS:
            raise SpecError(f"Override '{key}' is set by the operator (the job folder under results_root); "
                            "remove it and pass results_root to the operator instead.")
        groups.setdefault(owner_action(key, action), {})[key] = value
    for owner, group in groups.items():
        resolve_spec_dict(owner, overrides=group)


def refuse_secret_keys(overrides: Mapping[str, Any]) -> None:
    """SpecError naming the first secret key in ``overrides`` (its value is never repeated)."""
    secrets = set(secret_keys())
    for key in overrides:
        if key in secrets:
            raise SpecError(f"Override '{key}' is a secret and is refused in spec_overrides: overrides are stored in "
                            "the DAG run conf and the rendered task templates, where anyone who can read the run "
                            "sees them; give the operator encryption_key_conn_id (an Airflow connection whose "
                            "password is the key) or encryption_key_variable instead.")


def _holds_template(value: Any) -> bool:
    if is_templated(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_template(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_template(v) for v in value)
    return False


def validate_literal_overrides(action: str, value: Any) -> None:
    """DAG-parse check of an operator's literal ``spec_overrides`` (a templated string is left to execute)."""
    if value is None or is_templated(value) or not isinstance(value, (Mapping, str, list, tuple)):
        return
    validate_overrides(action, coerce_overrides(value), skip_templated=True)


def overrides_for_action(action: str, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """The keys of the sections ``action`` reads."""
    sections = ACTION_SECTIONS[action]
    return {k: v for k, v in overrides.items() if k.split(".", 1)[0] in sections}
