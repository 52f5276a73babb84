"""Spec dataclasses (the single source of every key), schema generation and spec resolution."""

from .errors import SpecError
from .experiment import ACTION_SECTIONS, ACTIONS, ExperimentConfig
from .loader import (UNUSED_RECORD_KEY, Resolution, load_spec, parse_override_words, resolve_spec, resolve_spec_dict,
                     spec_to_dict, unused_line)
from .model import SWIN_PRESETS

__all__ = ["ACTIONS", "ACTION_SECTIONS", "ExperimentConfig", "Resolution", "SpecError", "SWIN_PRESETS",
           "UNUSED_RECORD_KEY", "load_spec", "parse_override_words", "resolve_spec", "resolve_spec_dict",
           "spec_to_dict", "unused_line"]
