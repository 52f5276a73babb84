"""Spec dataclasses (the single source of every key), schema generation and spec resolution."""

from .errors import SpecError
from .experiment import ACTION_SECTIONS, ACTIONS, ExperimentConfig
from .loader import load_spec, parse_override_words, resolve_spec_dict, spec_to_dict
from .model import SWIN_PRESETS

__all__ = ["ACTIONS", "ACTION_SECTIONS", "ExperimentConfig", "SpecError", "SWIN_PRESETS", "load_spec",
           "parse_override_words", "resolve_spec_dict", "spec_to_dict"]
