"""Declaring spec keys: one helper that puts a key's default, bounds and AutoML metadata in one place.

Every key of every section is a dataclass field declared with :func:`spec_field`. The schema
generator, the override validator, the spec templates and the AutoML search space all read the
metadata written here, so a key is described exactly once.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional, Sequence

_MISSING = dataclasses.MISSING


def spec_field(
    default: Any = _MISSING,
    *,
    description: str,
    default_factory: Any = _MISSING,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: Optional[float] = None,
    enum: Optional[Sequence[Any]] = None,
    multiple_of: Optional[int] = None,
    min_items: Optional[int] = None,
    max_items: Optional[int] = None,
    automl_enabled: bool = False,
    automl_min: Optional[float] = None,
    automl_max: Optional[float] = None,
    automl_log_scale: bool = False,
    option_weights: Optional[Sequence[float]] = None,
    math_cond: Optional[str] = None,
    depends_on: Optional[str] = None,
    popular: bool = False,
    nullable: bool = False,
    secret: bool = False,
    no_effect: Optional[str] = None,
    unimplemented: Optional[Dict[str, str]] = None,
) -> Any:
    """A dataclass field carrying the spec metadata.

    ``automl_min``/``automl_max`` narrow the search range inside ``minimum``/``maximum`` (the valid
    range may be far wider than a sensible search range). ``math_cond`` follows TAO's notation:
    ``"/ 8"`` means a multiple of 8, ``"^ 2"`` a power of two. ``depends_on`` names another key
    whose value bounds this one (``math_cond`` then reads e.g. ``"> depends_on"``). ``math_cond`` only
    shapes AutoML samples; ``multiple_of`` is a hard rule checked on every spec. ``secret`` keys
    are never written to experiment.yaml, logs or XCom. ``no_effect`` marks a key accepted for TAO spec
    files that does nothing here; the sentence says why, and the log repeats it when a spec sets the key.
    ``unimplemented`` maps values TAO accepts but this tool does not implement to the reason given when a
    spec uses one.
    """
    if option_weights is not None and (enum is None or len(option_weights) != len(enum)):
        raise ValueError(f"option_weights for {description!r} needs one weight per enum value")
    meta = {
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "enum": list(enum) if enum is not None else None,
        "multiple_of": multiple_of,
        "min_items": min_items,
        "max_items": max_items,
        "automl_enabled": automl_enabled,
        "automl_min": automl_min,
        "automl_max": automl_max,
        "automl_log_scale": automl_log_scale,
        "option_weights": list(option_weights) if option_weights is not None else None,
        "math_cond": math_cond,
        "depends_on": depends_on,
        "popular": popular,
        "nullable": nullable,
        "secret": secret,
        "no_effect": no_effect,
        "unimplemented": dict(unimplemented) if unimplemented else None,
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        frozen = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(frozen), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, description: str) -> Any:
    """A nested section field (a dataclass instance built with its defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"description": description, "section": True})
