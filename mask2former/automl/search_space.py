"""The hyper-parameter search space, read from the generated train schema and ``specs/skill_info.yaml``.

Which keys: ``automl_default_parameters`` minus ``automl_disabled_parameters``, then the run's
removals, additions and custom ranges. Any leaf of the train schema may be added, except the
disabled ones (data locations, devices, the epoch budget AutoML owns, ...); lists cannot be searched.

Each key becomes a :class:`Parameter`:

* integers and floats take ``valid_min``/``valid_max`` (skill_info, else the schema's
  ``automl_min``/``automl_max``, else ``minimum``/``maximum``); a custom range must stay inside the
  schema's hard bounds;
* ``math_cond "/ n"``: an integer multiple of n (combined with the schema's ``multipleOf``);
  ``math_cond "^ b"``: a power of b;
* enums draw from ``valid_options`` with ``option_weights`` (a weighted enum is sampled through a
  uniform quantile, so the random sampler honours the weights and TPE still models it); booleans
  draw from [false, true];
* ``log_scale`` (the learning rate and weight decay by default) samples uniformly in log space.

Cross-key rules are respected by construction: a key that another key must divide is sampled first
and narrows the other's multiple (``hidden_dim`` and ``convs_dim`` multiples of ``nheads``; Swin
``embed_dim`` such that every stage width is divisible by its head count); a searched key whose draws
would break a rule on a key left at its base value (``nheads`` 6 with ``hidden_dim`` 256) is refused
when the space is built. The resulting spec is then validated with
:func:`mask2former.config.load_spec` by the trial; a spec that is still refused fails that trial with
the loader's message, and the search goes on.

Sampled values are the spec values (the trial's ``overrides``); for powers and weighted enums the
Optuna parameter is the exponent (``<key>:log<b>``) or the quantile (``<key>:quantile``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .policy import AutoMLConfigError

RANGE_KEYS = ("valid_min", "valid_max", "valid_options", "option_weights", "math_cond", "log_scale")
KINDS = ("int", "float", "categorical")
#: At most this many candidate values are enumerated when checking a dependent key's feasibility.
MAX_ENUMERATED = 4096

HIDDEN_DIM = "model.mask_former.hidden_dim"
NHEADS = "model.mask_former.nheads"
CONVS_DIM = "model.sem_seg_head.convs_dim"
SWIN_TYPE = "model.backbone.swin.type"
SWIN_EMBED_DIM = "model.backbone.swin.embed_dim"
SWIN_NUM_HEADS = "model.backbone.swin.num_heads"


class SearchSpaceError(AutoMLConfigError):
    """A search-space request that cannot be honoured; the message names the key and the reason."""


# ----------------------------------------------------------------------------------------- cross-key rules


def _nheads_multiple(values: Mapping[str, Any]) -> int:
    return int(values.get(NHEADS) or 1)


def _embed_dim_multiple(values: Mapping[str, Any]) -> int:
    """The smallest m such that every stage width embed_dim * 2^i is divisible by num_heads[i]."""
    from mask2former.config.model import SWIN_PRESETS

    heads = values.get(SWIN_NUM_HEADS)
    if heads is None:
        heads = SWIN_PRESETS[values.get(SWIN_TYPE) or "tiny"]["num_heads"]
    multiple = 1
    for stage, h in enumerate(heads):
        needed = int(h) // math.gcd(int(h), 2 ** stage)
        multiple = multiple * needed // math.gcd(multiple, needed)
    return multiple


@dataclass(frozen=True)
class CrossKeyRule:
    """``key`` must be a multiple of ``multiple(values)``, which reads ``depends_on``."""

    key: str
    depends_on: Tuple[str, ...]
    multiple: Callable[[Mapping[str, Any]], int]
    description: str


CROSS_KEY_RULES = (
    CrossKeyRule(HIDDEN_DIM, (NHEADS,), _nheads_multiple, "a multiple of model.mask_former.nheads"),
    CrossKeyRule(CONVS_DIM, (NHEADS,), _nheads_multiple,
                 "a multiple of model.mask_former.nheads (the pixel decoder's deformable attention uses them)"),
    CrossKeyRule(SWIN_EMBED_DIM, (SWIN_TYPE, SWIN_NUM_HEADS), _embed_dim_multiple,
                 "such that every Swin stage width embed_dim * 2^i is divisible by num_heads[i]"),
)
_RULES_BY_KEY = {rule.key: rule for rule in CROSS_KEY_RULES}


# ---------------------------------------------------------------------------------------------- parameters


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


@dataclass(frozen=True)
class Parameter:
    """One searched key and its domain (see the module docstring)."""

    key: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    multiple_of: int = 1
    power_base: Optional[int] = None
    choices: Optional[Tuple[Any, ...]] = None
    weights: Optional[Tuple[float, ...]] = None

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for name in ("choices", "weights"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Parameter":
        data = dict(data)
        for name in ("choices", "weights"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    # -- integer domains -------------------------------------------------------------------------

    def int_values_bounds(self, extra_multiple: int = 1) -> Tuple[int, int, int]:
        """(lowest, highest, step) of the integers this parameter may take with an extra multiple."""
        step = _lcm(self.multiple_of, max(1, extra_multiple))
        low = math.ceil(self.low / step) * step
        high = math.floor(self.high / step) * step
        return low, high, step

    def exponent_bounds(self, extra_multiple: int = 1) -> Tuple[int, int]:
        """(lowest, highest) exponent e with power_base ** e inside the range and a multiple of the step."""
        step = _lcm(self.multiple_of, max(1, extra_multiple))
        base = self.power_base
        e = 0
        while base ** e < self.low or (base ** e) % step:
            e += 1
            if base ** e > self.high:
                return 1, 0
        e_high = e
        while base ** (e_high + 1) <= self.high:
            e_high += 1
        return e, e_high

    def candidates(self, extra_multiple: int = 1) -> List[Any]:
        """Every value the parameter may take (ints and enums), or [] when there is none."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind != "int":
            raise SearchSpaceError(f"{self.key}: a float parameter has no finite list of values.")
        if self.power_base:
            lo, hi = self.exponent_bounds(extra_multiple)
            return [self.power_base ** e for e in range(lo, hi + 1)]
        lo, hi, step = self.int_values_bounds(extra_multiple)
        return list(range(lo, hi + 1, step)) if lo <= hi else []

    # -- sampling ------------------------------------------------------------------------------------

    def sample(self, trial: Any, extra_multiple: int = 1, describe_extra: str = "") -> Any:
        """Draw a spec value through an Optuna trial."""
        if self.kind == "float":
            return float(trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log))
        if self.kind == "categorical":
            if self.weights is None:
                return trial.suggest_categorical(self.key, list(self.choices))
            quantile = trial.suggest_float(f"{self.key}:quantile", 0.0, 1.0)
            return self.choices[_weighted_index(self.weights, quantile)]
        if self.power_base:
            lo, hi = self.exponent_bounds(extra_multiple)
            self._check_nonempty(lo, hi, extra_multiple, describe_extra)
            return int(self.power_base ** trial.suggest_int(f"{self.key}:log{self.power_base}", lo, hi))
        lo, hi, step = self.int_values_bounds(extra_multiple)
        self._check_nonempty(lo, hi, extra_multiple, describe_extra)
        if self.log:
            return int(trial.suggest_int(self.key, lo, hi, log=True))
        return int(trial.suggest_int(self.key, lo, hi, step=step))

    def _check_nonempty(self, lo: int, hi: int, extra_multiple: int, describe_extra: str) -> None:
        if lo > hi:
            rule = f" and {describe_extra} ({extra_multiple})" if extra_multiple > 1 else ""
            raise SearchSpaceError(f"{self.key}: no value in [{self.low}, {self.high}] is {self.describe()}{rule}.")

    def describe(self) -> str:
        if self.kind == "categorical":
            weights = f" weights {list(self.weights)}" if self.weights else ""
            return f"one of {list(self.choices)}{weights}"
        parts = [f"{self.kind} in [{self.low}, {self.high}]"]
        if self.log:
            parts.append("log scale")
        if self.multiple_of > 1:
            parts.append(f"multiple of {self.multiple_of}")
        if self.power_base:
            parts.append(f"power of {self.power_base}")
        return ", ".join(parts)


def _weighted_index(weights: Sequence[float], quantile: float) -> int:
    total = float(sum(weights))
    running = 0.0
    for index, weight in enumerate(weights):
        running += weight / total
        if quantile < running:
            return index
    return len(weights) - 1


# ------------------------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters in sampling order (keys that others depend on first)."""

    parameters: Tuple[Parameter, ...]

    @property
    def keys(self) -> List[str]:
        return [p.key for p in self.parameters]

    def to_dict(self) -> Dict[str, Any]:
        return {"parameters": [p.to_dict() for p in self.parameters]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        return cls(tuple(Parameter.from_dict(p) for p in data["parameters"]))

    def sample(self, trial: Any, base_values: Mapping[str, Any]) -> Dict[str, Any]:
        """Dotted overrides for one trial. ``base_values``: the flattened resolved spec the trial starts from."""
        values = dict(base_values)
        sampled: Dict[str, Any] = {}
        for parameter in self.parameters:
            rule = _RULES_BY_KEY.get(parameter.key)
            extra = rule.multiple(values) if rule else 1
            value = parameter.sample(trial, extra, rule.description if rule else "")
            sampled[parameter.key] = value
            values[parameter.key] = value
        return sampled

    def check_feasible(self, base_values: Mapping[str, Any]) -> None:
        """Raise :class:`SearchSpaceError` when a rule-bound key has no valid value for some draw of its inputs,
        or when a draw of searched inputs breaks a rule on a key left at its base value."""
        by_key = {p.key: p for p in self.parameters}
        for rule in CROSS_KEY_RULES:
            if rule.key in by_key or rule.key not in base_values:
                continue
            for inputs in _input_combinations(rule, by_key, base_values):
                extra = rule.multiple({**base_values, **inputs})
                if inputs and int(base_values[rule.key]) % extra:
                    drawn = ", ".join(f"{k}={v}" for k, v in inputs.items())
                    raise SearchSpaceError(
                        f"{', '.join(inputs)}: the draw {drawn} breaks the rule that {rule.key} "
                        f"(= {base_values[rule.key]}, not searched) is {rule.description}; narrow "
                        f"{', '.join(inputs)} (valid_options or math_cond) or search {rule.key} too.")
        for parameter in self.parameters:
            rule = _RULES_BY_KEY.get(parameter.key)
            if rule is None or parameter.kind == "categorical":
                continue
            for inputs in _input_combinations(rule, by_key, base_values):
                values = {**base_values, **inputs}
                extra = rule.multiple(values)
                if not parameter.candidates(extra):
                    drawn = ", ".join(f"{k}={v}" for k, v in inputs.items()) or "the base spec"
                    raise SearchSpaceError(
                        f"{parameter.key}: no value in [{parameter.low}, {parameter.high}] is "
                        f"{parameter.describe()} and {rule.description} ({extra}, with {drawn}); widen its range "
                        f"or narrow {', '.join(rule.depends_on)}.")

    def describe(self) -> List[str]:
        return [f"{p.key}: {p.describe()}" for p in self.parameters]


def _input_combinations(rule: CrossKeyRule, by_key: Mapping[str, Parameter],
                        base_values: Mapping[str, Any]) -> Iterable[Dict[str, Any]]:
    """Every draw of a rule's searched inputs (the rule's other inputs come from the base spec)."""
    combos: List[Dict[str, Any]] = [{}]
    for key in rule.depends_on:
        if key not in by_key:
            continue
        values = by_key[key].candidates()[:MAX_ENUMERATED]
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A resolved spec tree as dotted key -> value (lists are values)."""
    flat: Dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------- construction


def _leaf_types(leaf: Mapping[str, Any]) -> List[str]:
    types = leaf.get("type")
    return list(types) if isinstance(types, list) else [types]


def _kind_of(key: str, leaf: Mapping[str, Any]) -> str:
    types = [t for t in _leaf_types(leaf) if t != "null"]
    if "enum" in leaf or types == ["boolean"]:
        return "categorical"
    if types == ["integer"]:
        return "int"
    if types == ["number"]:
        return "float"
    raise SearchSpaceError(f"{key} ({'/'.join(types)}) cannot be searched: AutoML varies integers, numbers, "
                           "booleans and enums, not lists or free strings.")


def _parse_math_cond(key: str, cond: Optional[str], kind: str) -> Tuple[int, Optional[int]]:
    """(multiple_of, power_base) from TAO's ``"/ n"`` or ``"^ b"``."""
    if not cond:
        return 1, None
    op, _, number = str(cond).strip().partition(" ")
    try:
        value = int(number.strip())
    except ValueError:
        value = 0
    if op not in ("/", "^") or value < 2:
        raise SearchSpaceError(f"{key}: math_cond {cond!r} is not supported; expected '/ n' (multiples of n) or "
                               "'^ b' (powers of b), with n, b >= 2.")
    if kind != "int":
        raise SearchSpaceError(f"{key}: math_cond {cond!r} applies to integers only, and {key} is a {kind}.")
    return (value, None) if op == "/" else (1, value)


def _number(key: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchSpaceError(f"{key}: {name} must be a number, got {value!r}.")
    return float(value)


def _make_parameter(key: str, leaf: Mapping[str, Any], entry: Mapping[str, Any]) -> Parameter:
    """A parameter from a skill_info-style entry (valid_min, valid_max, valid_options, ...) and its schema leaf."""
    kind = _kind_of(key, leaf)
    if kind == "categorical":
        allowed = [v for v in leaf.get("enum", [False, True]) if v is not None]
        options = list(entry.get("valid_options") or allowed)
        bad = [o for o in options if o not in allowed]
        if bad or not options:
            raise SearchSpaceError(f"{key}: valid_options {options!r} must be a non-empty subset of {allowed!r}.")
        weights = entry.get("option_weights")
        if weights is None and leaf.get("option_weights") and options == allowed:
            weights = leaf["option_weights"]
        if weights is not None:
            if len(weights) != len(options) or any(_number(key, "option_weights", w) < 0 for w in weights) \
                    or sum(weights) <= 0:
                raise SearchSpaceError(f"{key}: option_weights {list(weights)!r} need one non-negative weight per "
                                       f"option of {options!r}, not all zero.")
            weights = tuple(float(w) for w in weights)
        if entry.get("math_cond") or entry.get("log_scale"):
            raise SearchSpaceError(f"{key}: an enum takes valid_options and option_weights, not math_cond or "
                                   "log_scale.")
        return Parameter(key=key, kind=kind, choices=tuple(options), weights=weights)

    if entry.get("valid_options") is not None or entry.get("option_weights") is not None:
        raise SearchSpaceError(f"{key}: valid_options/option_weights apply to enums; {key} is a {kind} "
                               "(give valid_min and valid_max).")
    low = entry.get("valid_min", leaf.get("automl_min", leaf.get("minimum", leaf.get("exclusiveMinimum"))))
    high = entry.get("valid_max", leaf.get("automl_max", leaf.get("maximum")))
    if low is None or high is None:
        raise SearchSpaceError(f"{key}: the schema gives no {'lower' if low is None else 'upper'} bound to search "
                               "within; add a custom range with valid_min and valid_max.")
    low, high = _number(key, "valid_min", low), _number(key, "valid_max", high)
    if low > high:
        raise SearchSpaceError(f"{key}: valid_min {low} is above valid_max {high}.")
    hard_low, hard_high = leaf.get("minimum"), leaf.get("maximum")
    if hard_low is not None and low < hard_low:
        raise SearchSpaceError(f"{key}: valid_min {low} is below the schema minimum {hard_low}.")
    if leaf.get("exclusiveMinimum") is not None and low <= leaf["exclusiveMinimum"]:
        raise SearchSpaceError(f"{key}: valid_min {low} must be above {leaf['exclusiveMinimum']} (exclusive "
                               "minimum of the schema).")
    if hard_high is not None and high > hard_high:
        raise SearchSpaceError(f"{key}: valid_max {high} is above the schema maximum {hard_high}.")
    log = bool(entry.get("log_scale", leaf.get("automl_log_scale", False)))
    multiple, power = _parse_math_cond(key, entry.get("math_cond", leaf.get("math_cond")), kind)
    if leaf.get("multipleOf"):
        multiple = _lcm(multiple, int(leaf["multipleOf"]))
    if log and low <= 0:
        raise SearchSpaceError(f"{key}: log_scale needs valid_min > 0, got {low}.")
    if log and (multiple > 1 or power):
        raise SearchSpaceError(f"{key}: log_scale cannot be combined with math_cond (use '^ 2' for powers of two).")
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise SearchSpaceError(f"{key}: an integer range needs whole bounds, got [{low}, {high}].")
        low, high = int(low), int(high)
    parameter = Parameter(key=key, kind=kind, low=low, high=high, log=log, multiple_of=multiple, power_base=power)
    if kind == "int" and not parameter.candidates():
        raise SearchSpaceError(f"{key}: no value in [{low}, {high}] is {parameter.describe()}.")
    return parameter


def _nearest(key: str, candidates: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(k) for k in near)}?" if near else ""


def _check_range_entry(key: str, entry: Any) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise SearchSpaceError(f"custom range of {key} must be a mapping with {', '.join(RANGE_KEYS)}; got {entry!r}.")
    unknown = sorted(set(entry) - set(RANGE_KEYS))
    if unknown:
        raise SearchSpaceError(f"custom range of {key}: unknown field(s) {', '.join(unknown)}; allowed: "
                               f"{', '.join(RANGE_KEYS)}.")
    return entry


def _order(parameters: List[Parameter]) -> Tuple[Parameter, ...]:
    """Inputs of cross-key rules before the keys they constrain; otherwise the given order."""
    keys = {p.key for p in parameters}
    first = {dep for rule in CROSS_KEY_RULES if rule.key in keys for dep in rule.depends_on}
    return tuple([p for p in parameters if p.key in first] + [p for p in parameters if p.key not in first])


def build_search_space(schema: Mapping[str, Any], skill_info: Mapping[str, Any], *,
                       add: Sequence[str] = (), remove: Sequence[str] = (),
                       custom_ranges: Optional[Mapping[str, Mapping[str, Any]]] = None,
                       base_values: Optional[Mapping[str, Any]] = None) -> SearchSpace:
    """The search space of one run (see the module docstring).

    ``add``: train-schema keys searched on top of the defaults (range from the schema, or from
    ``custom_ranges``); ``remove``: default keys left at the spec's value; ``custom_ranges``: key ->
    ``{valid_min, valid_max, valid_options, option_weights, math_cond, log_scale}`` (a key given a
    range is added when it is not searched yet). ``base_values`` (the flattened base spec) lets the
    cross-key rules be checked now rather than at the first trial.
    """
    from mask2former.config.schema import iter_leaves

    leaves = dict(iter_leaves(dict(schema)))
    custom = dict(custom_ranges or {})
    disabled = set(skill_info.get("automl_disabled_parameters") or [])
    entries: Dict[str, Mapping[str, Any]] = {}
    for entry in skill_info.get("automl_default_parameters") or []:
        if entry["parameter"] not in disabled:
            entries[entry["parameter"]] = entry

    def known(key: str, what: str) -> None:
        if not isinstance(key, str) or key not in leaves:
            raise SearchSpaceError(f"{what} {key!r} is not a key of the train schema.{_nearest(str(key), leaves)}")
        if key in disabled:
            raise SearchSpaceError(f"{what} {key!r}: AutoML never varies it (automl_disabled_parameters in "
                                   "specs/skill_info.yaml: data, devices, bookkeeping and the epoch budget).")

    for key in remove:
        known(key, "remove_parameters")
        if key in add or key in custom:
            raise SearchSpaceError(f"{key} is both removed and added (or given a custom range); keep one.")
        if key not in entries:
            raise SearchSpaceError(f"remove_parameters {key!r} is not in the default search space "
                                   f"({', '.join(entries)}).")
        del entries[key]
    for key in list(add) + [k for k in custom if k not in add]:
        known(key, "add_parameters" if key in add else "custom_ranges")
        entries.setdefault(key, {})
    parameters = []
    for key, entry in entries.items():
        merged = {k: v for k, v in entry.items() if k in RANGE_KEYS}
        if key in custom:
            requested = _check_range_entry(key, custom[key])
            if "valid_options" in requested and "option_weights" not in requested:
                merged.pop("option_weights", None)
            merged.update(requested)
        parameters.append(_make_parameter(key, leaves[key], merged))
    if not parameters:
        raise SearchSpaceError("the search space is empty: every default parameter was removed and none added.")
    space = SearchSpace(_order(parameters))
    if base_values is not None:
        space.check_feasible(base_values)
    return space


__all__ = ["CROSS_KEY_RULES", "Parameter", "RANGE_KEYS", "SearchSpace", "SearchSpaceError", "build_search_space",
           "flatten"]
