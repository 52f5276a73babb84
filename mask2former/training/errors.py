"""Errors of training setup and data, each a one-sentence message that names the key, file or value."""

from __future__ import annotations


class TrainingSetupError(ValueError):
    """The spec asks for something this run cannot do (a device, a weights file, a freeze prefix)."""


class DatasetError(ValueError):
    """A dataset input is missing or malformed; the message names the split, the file and the problem."""
