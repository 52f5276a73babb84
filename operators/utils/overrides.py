"""Spec overrides as the operators take them: coerced, checked at DAG parse (literals) and once at execute.

Operators receive one dict of flat dotted keys (``{"train.num_epochs": 10, "model.mode": "semantic"}``)
and share it across a pipeline, as one TAO spec serves every action: a key's value is validated by the action
that reads its section (``export.*`` by export, ``model.*`` and ``dataset.*`` by train, ...), and every key
goes to every job, whose engine reports the keys its action does not use (one log line and experiment.yaml).
A key no action reads is refused with the nearest keys. The rules are the engine's own
(:mod:`mask2former.config`): no torch, cheap enough for DAG parsing.

Secret keys (``encryption_key``) are refused, even templated: overrides are stored in the DAG run conf
and in the rendered template fields, where anyone who can read the run sees them. The operators take
the key from an Airflow connection or Variable instead (:mod:`operators.utils.encryption`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Dict

import yaml

from mask2former.config import ACTION_SECTIONS, ACTIONS, SpecError, load_spec, parse_override_words, resolve_spec_dict
from mask2former.config.loader import safe_yaml_load
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
                parsed = safe_yaml_load(value, source="spec_overrides")
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


def _by_owner(action: str, overrides: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The keys grouped by the action that validates them: ``action`` for the sections it reads, else the first
    action that reads the key's section (a key no action reads stays with ``action``, which names the nearest)."""
    groups: Dict[str, Dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in OPERATOR_OWNED_KEYS:
            raise SpecError(f"Override '{key}' is set by the operator (the job folder under results_root); "
                            "remove it and pass results_root to the operator instead.")
        top = key.split(".", 1)[0]
        owner = next((a for a in (action, *ACTIONS) if top in ACTION_SECTIONS[a]), action)
        groups.setdefault(owner, {})[key] = value
    return groups


def job_overrides(action: str, overrides: Mapping[str, Any], derived: Mapping[str, Any]) -> Dict[str, Any]:
    """The one check of a job's spec at execute: the job's spec keys and whether they can run.

    ``derived`` (the planned data sources and the parent model) comes first, then the user's ``overrides``;
    together they are resolved by the engine (:func:`mask2former.config.load_spec`, cross-key rules included).
    The user's keys of sections that only other actions read (one dict of overrides serves a whole pipeline)
    are validated by those actions and passed on: the job reports them as not used by ``action``. Raises
    :class:`SpecError` naming the key.
    """
    refuse_secret_keys(overrides)
    groups = _by_owner(action, overrides)
    for owner, group in groups.items():
        if owner != action:
            resolve_spec_dict(owner, overrides=group)
    merged = {**derived, **overrides}
    load_spec(action, overrides=merged)
    return merged


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
    """DAG-parse check of an operator's literal ``spec_overrides`` (keys and values holding Jinja are left to
    execute): unknown keys, types, bounds and enums, each by the action that reads its section."""
    if value is None or is_templated(value) or not isinstance(value, (Mapping, str, list, tuple)):
        return
    coerced = coerce_overrides(value)
    refuse_secret_keys(coerced)
    literal = {k: v for k, v in coerced.items() if not (is_templated(k) or _holds_template(v))}
    for owner, group in _by_owner(action, literal).items():
        resolve_spec_dict(owner, overrides=group)
