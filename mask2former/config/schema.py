"""JSON Schema (2020-12, with TAO-style metadata) generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Iterator, List, Tuple

from .experiment import ACTION_DESCRIPTIONS, ACTION_SECTIONS, COMMON_KEYS, ExperimentConfig

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_METADATA_KEYS = ("automl_enabled", "option_weights", "math_cond", "depends_on", "popular")


def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _value_schema(tp: Any, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Schema of one value (no metadata), with bounds on scalars or list items."""
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if typing.get_origin(tp) is dict:
        return {"type": "object", "additionalProperties": True}  # a free mapping: one value, not a section
    if typing.get_origin(tp) in (list, List):
        (item_tp,) = typing.get_args(tp)
        schema: Dict[str, Any] = {"type": "array", "items": _value_schema(item_tp, meta)}
        if meta.get("min_items") is not None:
            schema["minItems"] = meta["min_items"]
        if meta.get("max_items") is not None:
            schema["maxItems"] = meta["max_items"]
        return schema
    if tp not in _SCALARS:
        raise TypeError(f"unsupported spec field type {tp!r}")
    schema = {"type": _SCALARS[tp]}
    if meta.get("enum") is not None:
        schema["enum"] = list(meta["enum"])
    if meta.get("minimum") is not None:
        schema["minimum"] = meta["minimum"]
    if meta.get("maximum") is not None:
        schema["maximum"] = meta["maximum"]
    if meta.get("exclusive_minimum") is not None:
        schema["exclusiveMinimum"] = meta["exclusive_minimum"]
    if meta.get("multiple_of") is not None:
        schema["multipleOf"] = meta["multiple_of"]
    return schema


def _field_schema(field: dataclasses.Field, tp: Any) -> Dict[str, Any]:
    meta = dict(field.metadata)
    inner, optional = _unwrap_optional(tp)
    schema = _value_schema(inner, meta)
    if optional or meta.get("nullable"):
        if "type" in schema:
            schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = schema["enum"] + [None]
    schema["description"] = meta.get("description", "")
    if meta.get("no_effect"):
        schema["description"] += f" No effect here: {meta['no_effect']}"
    if meta.get("secret"):
        schema["writeOnly"] = True  # JSON Schema's mark for a value that is given but never read back
    if not meta.get("section"):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        schema["default"] = _jsonable(default)
        for key in _METADATA_KEYS:
            if meta.get(key) not in (None, False):
                schema[key] = meta[key]
        if meta.get("automl_enabled"):
            schema["automl_enabled"] = True
            if meta.get("automl_min") is not None:
                schema["automl_min"] = meta["automl_min"]
            if meta.get("automl_max") is not None:
                schema["automl_max"] = meta["automl_max"]
            if meta.get("automl_log_scale"):
                schema["automl_log_scale"] = True
        else:
            schema["automl_enabled"] = False
    return schema


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def dataclass_schema(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {f.name: _field_schema(f, hints[f.name]) for f in dataclasses.fields(cls)}
    return {"type": "object", "properties": props, "additionalProperties": False}


def action_schema(action: str) -> Dict[str, Any]:
    """The schema of one action's spec: the common top-level keys plus the sections the action reads."""
    full = dataclass_schema(ExperimentConfig)
    keep = COMMON_KEYS + ACTION_SECTIONS[action]
    schema = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"mask2former/{action}.schema.json",
        "title": f"Mask2Former {action} spec",
        "description": ACTION_DESCRIPTIONS[action],
        "type": "object",
        "properties": {k: full["properties"][k] for k in keep},
        "additionalProperties": False,
    }
    return schema


def secret_keys(cls: type = ExperimentConfig, prefix: str = "") -> List[str]:
    """Dotted names of the fields marked ``secret`` (never written to experiment.yaml, logs or XCom)."""
    keys = []
    for field in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(typing.get_type_hints(cls)[field.name])
        if field.metadata.get("secret"):
            keys.append(prefix + field.name)
        elif dataclasses.is_dataclass(tp):
            keys.extend(secret_keys(tp, f"{prefix}{field.name}."))
    return keys


def _keys_with(meta_key: str, cls: type = ExperimentConfig, prefix: str = "") -> Dict[str, Any]:
    """Dotted key -> the ``meta_key`` metadata of every field that sets it."""
    found = {}
    for field in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(typing.get_type_hints(cls)[field.name])
        if field.metadata.get(meta_key):
            found[prefix + field.name] = field.metadata[meta_key]
        elif dataclasses.is_dataclass(tp):
            found.update(_keys_with(meta_key, tp, f"{prefix}{field.name}."))
    return found


# Dotted key -> why the key, accepted for TAO spec files, has no effect here.
NO_EFFECT: Dict[str, str] = _keys_with("no_effect")
# Dotted key -> {TAO value not implemented here: why}.
UNIMPLEMENTED: Dict[str, Dict[str, str]] = _keys_with("unimplemented")


def is_section(schema: Dict[str, Any]) -> bool:
    """Whether a property's schema is a section of keys (a free mapping such as backend_kwargs is a value)."""
    return schema.get("type") == "object" and "properties" in schema


def iter_leaves(schema: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(dotted key, leaf schema) for every key that holds a value (lists of objects count as leaves)."""
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if is_section(sub):
            yield from iter_leaves(sub, key + ".")
        else:
            yield key, sub


def defaults_for(action: str) -> Dict[str, Any]:
    """The default spec of an action as a plain dict."""
    full = dataclasses.asdict(ExperimentConfig())
    return {k: full[k] for k in COMMON_KEYS + ACTION_SECTIONS[action]}
