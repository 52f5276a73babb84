"""Spec resolution: template defaults, then the user's YAML, then dotted overrides, then validation.

One spec serves every action, as in TAO: an action reads its own sections (and the common top-level
keys); keys of sections only other actions read are accepted by name, left unvalidated and reported as
unused by this action. A key that exists in no section is refused with the nearest keys.

``resolve_spec`` is the entry point that also returns those reports; ``load_spec`` returns the config
alone. Every failure is a :class:`SpecError` whose message names the key, the value given and what is
allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jsonschema
import yaml

from .errors import SpecError
from .experiment import ACTION_SECTIONS, ACTIONS, COMMON_KEYS, ExperimentConfig
from .model import SWIN_PRESETS, resolve_swin
from .rules import check_rules
from .schema import (NO_EFFECT, UNIMPLEMENTED, action_schema, dataclass_schema, defaults_for, is_section, iter_leaves,
                     secret_keys)

Overrides = Union[Mapping[str, Any], Sequence[str], None]

# OmegaConf's marker of a mandatory value that is not set, as TAO spec files use it.
NOT_SET = "???"
# Top-level key under which experiment.yaml records the keys its action does not read. A spec may hold it
# (it is ignored), so an experiment.yaml can be given back as a spec.
UNUSED_RECORD_KEY = "not_used_by_this_action"


@dataclasses.dataclass
class Resolution:
    """A resolved spec with what the log and experiment.yaml report about it."""

    config: ExperimentConfig
    unused: Dict[str, Any]  # dotted key -> value given, for keys of sections this action does not read
    notes: List[str]  # one sentence per value replaced by a preset and per key given that has no effect here


class _Collect:
    """What a merge noticed on the way: keys of other actions and keys given as OmegaConf's ``???``."""

    def __init__(self) -> None:
        self.unused: Dict[str, Any] = {}
        self.not_set: List[str] = []
        self.given: List[str] = []


@functools.lru_cache(maxsize=None)
def _schema(action: str) -> Dict[str, Any]:
    return action_schema(action)


@functools.lru_cache(maxsize=None)
def _full_schema() -> Dict[str, Any]:
    """Every section of every action: the keys a spec may hold."""
    return dataclass_schema(ExperimentConfig)


@functools.lru_cache(maxsize=None)
def _leaves(action: str) -> Dict[str, Dict[str, Any]]:
    return dict(iter_leaves(_schema(action)))


@functools.lru_cache(maxsize=None)
def _all_leaves() -> Dict[str, Dict[str, Any]]:
    return dict(iter_leaves(_full_schema()))


def _walk_sections(schema: Dict[str, Any], prefix: str, keys: List[str]) -> List[str]:
    for name, sub in schema.get("properties", {}).items():
        if is_section(sub):
            keys.append(prefix + name)
            _walk_sections(sub, prefix + name + ".", keys)
    return keys


@functools.lru_cache(maxsize=None)
def _section_keys(action: str) -> List[str]:
    return _walk_sections(_schema(action), "", [])


@functools.lru_cache(maxsize=None)
def _all_section_keys() -> List[str]:
    return _walk_sections(_full_schema(), "", [])


def _nearest_among(candidates: List[str], key: str, n: int) -> Tuple[List[str], List[str]]:
    """Keys close to ``key`` as a whole, then keys whose last part is (close to) ``key``'s last part."""
    close = difflib.get_close_matches(key, candidates, n=n, cutoff=0.6)
    last = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == last and c not in close]
    leaf_close = [c for c in candidates if c not in close and c not in same_leaf
                  and difflib.get_close_matches(last, [c.rsplit(".", 1)[-1]], n=1, cutoff=0.75)]
    return close, same_leaf + leaf_close


def nearest_keys(action: str, key: str, n: int = 3) -> List[str]:
    """Valid keys closest to a misspelt one: keys close as a whole (the action's own first, then those of
    every other section), then keys with a close last part."""
    own_close, own_leaf = _nearest_among(list(_leaves(action)) + _section_keys(action), key, n)
    every_close, every_leaf = _nearest_among(list(_all_leaves()) + _all_section_keys(), key, n)
    ranked = own_close + every_close + own_leaf + every_leaf
    return list(dict.fromkeys(ranked))[:n]


def _unknown_key_error(action: str, key: str) -> SpecError:
    near = nearest_keys(action, key)
    suggestion = f" Did you mean {', '.join(repr(k) for k in near)}?" if near else ""
    return SpecError(f"Unknown key '{key}': no action reads it.{suggestion}")


def parse_override_words(words: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` words from a command line; values are YAML-typed (``10``, ``true``, ``[1, 2]``)."""
    parsed: Dict[str, Any] = {}
    for word in words:
        if "=" not in word:
            raise SpecError(f"Override '{word}' is not of the form key=value (for example train.num_epochs=10).")
        key, raw = word.split("=", 1)
        key = key.strip()
        if not key:
            raise SpecError(f"Override '{word}' has an empty key.")
        try:
            parsed[key] = safe_yaml_load(raw, source=f"Override '{key}'") if raw.strip() != "" else None
        except yaml.YAMLError as exc:
            raise SpecError(f"Override '{key}': the value {raw!r} is not valid YAML ({exc.problem}).") from None
    return parsed


def _types(leaf: Dict[str, Any]) -> List[str]:
    types = leaf.get("type")
    return types if isinstance(types, list) else [types]


def _coerce(value: Any, leaf: Dict[str, Any]) -> Any:
    """Bring a value to the key's type the way TAO's loader reads it.

    Numbers YAML 1.1 leaves as strings (``1e-4``) become numbers; enum values match case-insensitively and
    take the canonical spelling (``fp16``/``FP16``, ``Warmuppoly``); an empty string on a key that may be
    null is null (TAO writes ``""`` for "no file").
    """
    types = _types(leaf)
    if isinstance(value, str) and ("number" in types or "integer" in types):
        try:
            number = float(value)
        except ValueError:
            return value
        if "integer" in types and number.is_integer() and "number" not in types:
            return int(number)
        return number
    if isinstance(value, str) and value == "" and "null" in types:
        return None
    if isinstance(value, str) and leaf.get("enum"):
        canonical = {v.lower(): v for v in leaf["enum"] if isinstance(v, str)}
        return canonical.get(value.lower(), value)
    if isinstance(value, list) and "array" in types:
        item = leaf.get("items", {})
        return [_coerce(v, item) for v in value]
    return value


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _reads(action: str, key: str) -> bool:
    """Whether ``action`` reads the dotted key (it lies in one of the action's sections or is a common key)."""
    return key.split(".", 1)[0] in COMMON_KEYS + ACTION_SECTIONS[action]


def _record_unused(action: str, key: str, value: Any, seen: _Collect, source: str) -> None:
    """Check the names under a key of a section ``action`` does not read and note its leaves as unused.

    Only the names are checked here: the values belong to another action, which validates them when it runs.
    """
    if key in _all_leaves():
        seen.unused[key] = copy.deepcopy(value)
        return
    if key not in _all_section_keys():
        raise _unknown_key_error(action, key)
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise SpecError(f"{source}: '{key}' is a section and takes a mapping of keys, got {value!r}.")
    for name, sub in value.items():
        _record_unused(action, f"{key}.{name}", sub, seen, source)


def _leaf_value(key: str, value: Any, leaf: Dict[str, Any], seen: _Collect) -> Any:
    seen.given.append(key)
    if value == NOT_SET:
        seen.not_set.append(key)
        return None
    value = _coerce(copy.deepcopy(value), leaf)
    refused = UNIMPLEMENTED.get(key, {})
    if isinstance(value, str) and value.lower() in refused:
        raise SpecError(f"{key} {value} is a TAO value that is not implemented here: {refused[value.lower()]}")
    return value


def _merge_mapping(action: str, base: Dict[str, Any], incoming: Mapping[str, Any], prefix: str, source: str,
                   seen: _Collect) -> None:
    leaves = _leaves(action)
    for name, value in incoming.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str):
            raise SpecError(f"{source}: key {name!r} under '{prefix.rstrip('.') or '(top level)'}' is not a string.")
        if key == UNUSED_RECORD_KEY:
            continue
        if key in leaves:
            base[name] = _leaf_value(key, value, leaves[key], seen)
        elif key in _section_keys(action):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise SpecError(f"{source}: '{key}' is a section and takes a mapping of keys, got {value!r}.")
            _merge_mapping(action, base.setdefault(name, {}), value, key + ".", source, seen)
        elif _reads(action, key):
            raise _unknown_key_error(action, key)
        else:
            _record_unused(action, key, value, seen, source)


def _apply_overrides(action: str, tree: Dict[str, Any], overrides: Mapping[str, Any], seen: _Collect) -> None:
    leaves = _leaves(action)
    sections = set(_section_keys(action))
    for key, value in overrides.items():
        if key in leaves:
            _set_dotted(tree, key, _leaf_value(key, value, leaves[key], seen))
        elif key in sections and isinstance(value, Mapping):
            node = tree
            for part in key.split("."):
                node = node.setdefault(part, {})
            _merge_mapping(action, node, value, key + ".", "override", seen)
        elif _reads(action, key):
            raise _unknown_key_error(action, key)
        else:
            _record_unused(action, key, value, seen, "override")


def _describe_allowed(schema: Dict[str, Any]) -> str:
    parts = []
    types = schema.get("type")
    if types:
        types = types if isinstance(types, list) else [types]
        names = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                 "array": "a list", "object": "a mapping", "null": "null"}
        parts.append(" or ".join(names.get(t, t) for t in types))
    if "enum" in schema:
        parts.append("one of " + ", ".join(repr(v) for v in schema["enum"]))
    if "minimum" in schema:
        parts.append(f">= {schema['minimum']}")
    if "exclusiveMinimum" in schema:
        parts.append(f"> {schema['exclusiveMinimum']}")
    if "maximum" in schema:
        parts.append(f"<= {schema['maximum']}")
    if "multipleOf" in schema:
        parts.append(f"a multiple of {schema['multipleOf']}")
    if "minItems" in schema or "maxItems" in schema:
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        parts.append(f"{lo} items" if lo == hi else f"between {lo or 0} and {hi or 'any number of'} items")
    if schema.get("type") == "array" and "items" in schema:
        parts.append("items: " + _describe_allowed(schema["items"]))
    return "; ".join(parts)


def _validation_error(action: str, error: jsonschema.ValidationError) -> SpecError:
    path = [str(p) for p in error.absolute_path]
    key_parts, index = [], None
    for p in path:
        if p.isdigit():
            index = int(p)
            break
        key_parts.append(p)
    key = ".".join(key_parts) or "(spec)"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return _unknown_key_error(action, ".".join(key_parts + [extra[0]]) if extra else key)
    schema = error.schema
    where = f" (item {index})" if index is not None else ""
    given = f"a {type(error.instance).__name__} (value hidden: secret key)" if schema.get("writeOnly") \
        else repr(error.instance)
    return SpecError(f"Invalid value for '{key}'{where}: got {given}; expected {_describe_allowed(schema)}.")


def dataclass_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value = data[field.name]
        tp = hints[field.name]
        kwargs[field.name] = _build_value(tp, value)
    return cls(**kwargs)


def _build_value(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    if typing.get_origin(tp) is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        return [_build_value(item_tp, v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


MAX_SPEC_BYTES = 1024 * 1024
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 32


def safe_yaml_load(text: Union[str, bytes], *, source: str) -> Any:
    """``yaml.safe_load`` with bounded work, for specs and override values from anyone.

    A spec holds a few hundred values, so refused with a :class:`SpecError` naming ``source``: bytes that
    are not UTF-8, more than :data:`MAX_SPEC_BYTES`, nesting deeper than :data:`MAX_YAML_DEPTH` (found in
    the parser's event stream, before the recursive composer), recursive aliases, and documents whose
    anchors and aliases expand to more than :data:`MAX_YAML_VALUES` values (a "billion laughs" document of
    a few hundred bytes expands to 10^9; everything after the parser walks the expanded tree). Counting
    works on the composed node graph, each shared node computed once, so the check is linear in the
    document. Malformed YAML raises ``yaml.YAMLError`` as ``yaml.safe_load`` does.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source} is {len(text)} bytes long; a spec is at most {MAX_SPEC_BYTES} bytes.")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(f"{source} is not UTF-8 text: byte 0x{text[exc.start]:02x} at offset {exc.start} is not "
                            "valid UTF-8 (save the file as UTF-8).") from None
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise SpecError(f"{source} nests more than {MAX_YAML_DEPTH} levels deep; a spec has a few.")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        counted: Dict[int, int] = {}

        def expanded(current: yaml.Node, open_nodes: set) -> int:
            key = id(current)
            if key in counted:
                return counted[key]
            if key in open_nodes:
                raise SpecError(f"{source} holds a recursive YAML alias (a value that contains itself).")
            open_nodes.add(key)
            children = current.value if isinstance(current, yaml.SequenceNode) else (
                [part for pair in current.value for part in pair] if isinstance(current, yaml.MappingNode) else [])
            counted[key] = 1 + sum(expanded(child, open_nodes) for child in children)
            open_nodes.discard(key)
            if counted[key] > MAX_YAML_VALUES:
                raise SpecError(f"{source} expands to more than {MAX_YAML_VALUES} values through YAML anchors and "
                                "aliases (a 'billion laughs' document?); a spec holds a few hundred.")
            return counted[key]

        expanded(node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_spec_file(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"Spec file '{path}' does not exist.")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"Spec file '{path}' is {path.stat().st_size} bytes long; a spec is at most {MAX_SPEC_BYTES} "
                        "bytes.")
    try:
        data = safe_yaml_load(path.read_bytes(), source=f"Spec file '{path}'")
    except yaml.YAMLError as exc:
        raise SpecError(f"Spec file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"Spec file '{path}' must hold a mapping of sections, got {type(data).__name__}.")
    return dict(data)


def _resolve_tree(action: str, spec: Optional[Mapping[str, Any]], overrides: Overrides,
                  seen: _Collect) -> Dict[str, Any]:
    if action not in ACTIONS:
        near = difflib.get_close_matches(action, ACTIONS, n=1)
        raise SpecError(f"Unknown action '{action}'; expected one of {', '.join(ACTIONS)}."
                        + (f" Did you mean '{near[0]}'?" if near else ""))
    tree = defaults_for(action)
    if spec:
        _merge_mapping(action, tree, spec, "", "spec", seen)
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_override_words(list(overrides))
        _apply_overrides(action, tree, overrides, seen)
    _type_from_dataset(tree, seen)
    leaves = _leaves(action)
    for key in seen.not_set:
        if _dotted_get(tree, key) is None and "null" not in _types(leaves[key]):
            raise SpecError(f"'{key}' is '{NOT_SET}', OmegaConf's mark of a required value that is not set: give "
                            f"it a value ({_describe_allowed(leaves[key])}).")
    validator = jsonschema.Draft202012Validator(_schema(action))
    errors = sorted(validator.iter_errors(tree), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise _validation_error(action, errors[0])
    return tree


def _type_from_dataset(tree: Dict[str, Any], seen: _Collect) -> None:
    """``dataset.type`` (as TAO's shipped infer.yaml writes it) is the type of the splits that name none."""
    dataset = tree.get("dataset")
    if not isinstance(dataset, dict) or not dataset.get("type"):
        return
    for split in ("train", "val", "test"):
        if f"dataset.{split}.type" not in seen.given:
            dataset.setdefault(split, {})["type"] = dataset["type"]


def _batch_from_dataset(config: ExperimentConfig) -> None:
    """evaluate/inference ``batch_size: -1`` (TAO's default) takes the batch size of the split they read."""
    if config.evaluate.batch_size == -1:
        config.evaluate.batch_size = config.dataset.val.batch_size
    if config.inference.batch_size == -1:
        config.inference.batch_size = config.dataset.test.batch_size


def _dotted_get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def resolve_spec_dict(action: str, spec: Optional[Mapping[str, Any]] = None,
                      overrides: Overrides = None) -> Dict[str, Any]:
    """Defaults, then ``spec``, then ``overrides``, validated against the action's schema; a plain dict of the
    action's sections (keys of other actions' sections are checked by name and left out)."""
    return _resolve_tree(action, spec, overrides, _Collect())


def resolve_spec(action: str, spec_path: Optional[Union[str, Path]] = None,
                 overrides: Overrides = None, spec: Optional[Mapping[str, Any]] = None) -> Resolution:
    """Resolve an action's spec into a typed :class:`ExperimentConfig` and report what it does not use.

    Order: the action's template defaults, the YAML file at ``spec_path`` (or the ``spec`` mapping),
    then ``overrides`` (a mapping of dotted keys, or ``key=value`` words). Raises :class:`SpecError`.
    """
    base = _with_recorded_keys(read_spec_file(spec_path) if spec_path is not None else {})
    if spec:
        base = _deep_merge(base, _with_recorded_keys(spec))
    seen = _Collect()
    tree = _resolve_tree(action, base, overrides, seen)
    config = dataclass_from_dict(ExperimentConfig, tree)
    try:
        replaced = resolve_swin(config.model.backbone.swin, preset_wins="model.backbone.swin.type" in seen.given)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    _batch_from_dataset(config)
    check_rules(action, config)
    notes = replaced + [f"{key} has no effect here: {NO_EFFECT[key]}" for key in dict.fromkeys(seen.given)
                        if key in NO_EFFECT]
    return Resolution(config=config, unused=seen.unused, notes=notes)


def load_spec(action: str, spec_path: Optional[Union[str, Path]] = None,
              overrides: Overrides = None, spec: Optional[Mapping[str, Any]] = None) -> ExperimentConfig:
    """The typed config of :func:`resolve_spec` alone."""
    return resolve_spec(action, spec_path=spec_path, overrides=overrides, spec=spec).config


def _with_recorded_keys(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """A spec with the keys an experiment.yaml recorded as not used by its action put back in their sections, so
    an experiment.yaml serves every action as the spec it came from did."""
    spec = dict(spec)
    recorded = spec.pop(UNUSED_RECORD_KEY, None)
    if not isinstance(recorded, Mapping):
        return spec
    nested: Dict[str, Any] = {}
    for key, value in recorded.items():
        _set_dotted(nested, str(key), value)
    return _deep_merge(nested, spec)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(copy.deepcopy(a))
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def spec_to_dict(action: str, config: ExperimentConfig, include_secrets: bool = False) -> Dict[str, Any]:
    """The resolved spec of an action (its sections only), as written to experiment.yaml.

    Secret keys (``encryption_key``) are left out unless ``include_secrets``: only a private hand-over
    between processes of one job (a 0600 temporary spec file that is deleted after) may carry them.
    """
    full = dataclasses.asdict(config)
    tree = {k: full[k] for k in COMMON_KEYS + ACTION_SECTIONS[action]}
    if not include_secrets:
        for key in secret_keys():
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node.get(part, {})
            node.pop(leaf, None)
    return tree


def unused_line(action: str, unused: Mapping[str, Any]) -> Optional[str]:
    """The one log line naming the keys of other actions' sections that ``action`` does not use."""
    if not unused:
        return None
    return (f"{len(unused)} spec key(s) belong to other actions' sections and are not used by {action}: "
            + ", ".join(unused))


__all__ = ["NOT_SET", "Resolution", "SpecError", "UNUSED_RECORD_KEY", "load_spec", "resolve_spec",
           "resolve_spec_dict", "unused_line", "parse_override_words", "spec_to_dict", "nearest_keys",
           "read_spec_file", "SWIN_PRESETS"]
