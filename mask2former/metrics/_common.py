"""Helpers shared by the evaluators: tensor-to-numpy conversion, PNG and JSON reading.

Kept free of a torch import: a tensor is recognised by its ``detach`` method, so the metrics
package can be used (and imported) where torch is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def to_integer_array(value, *, name: str, ndim: int) -> np.ndarray:
    """Return ``value`` (numpy array, torch tensor or nested list) as an integer numpy array.

    Raises TypeError when the values are not integers and ValueError when the number of
    dimensions is not ``ndim``; both messages name the argument.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {array.shape}")
    return array


def as_unsigned(array: np.ndarray) -> np.ndarray:
    """View a signed integer array as unsigned of the same width (no copy).

    Negative values become very large ones, so one upper-bound check catches both ends.
    """
    if array.dtype.kind == "i":
        return array.view(np.dtype(f"u{array.dtype.itemsize}"))
    return array


def lookup(table: np.ndarray, array: np.ndarray) -> np.ndarray:
    """``table[array]``, with every value outside ``0..len(table)-1`` sent to the last entry.

    The last entry of ``table`` is the caller's "unknown" sentinel, so out-of-range values are
    detected without a separate range check on narrow dtypes; 64-bit inputs are clipped first.
    """
    if array.dtype.itemsize < np.dtype(np.intp).itemsize:
        return table.take(as_unsigned(array), mode="clip")  # the unsigned view fits intp exactly
    if array.dtype.kind == "u":
        return table.take(np.minimum(array, table.size - 1).astype(np.intp), mode="clip")
    return table[np.clip(array, -1, table.size - 1)]  # -1 indexes the last entry


def read_png(path: str | Path) -> np.ndarray:
    """Read a PNG into a numpy array: [H, W] for single-channel, [H, W, C] otherwise.

    Palette ("P") images give their palette indices, which is how label PNGs store raw ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PNG not found: {path}")
    with Image.open(path) as image:
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"PNG {path} is {width}x{height} ({width * height} pixels), more than the "
                             f"{Image.MAX_IMAGE_PIXELS} pixels images may have")
        return np.asarray(image)


def load_json(source, *, name: str):
    """Return ``source`` if it is already a dict or list, else parse the JSON file it names."""
    if isinstance(source, (dict, list)):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} does not exist")
    with path.open() as handle:
        return json.load(handle)
