"""Reading JSON files from anyone (annotation files, label maps) with bounded work, and checking their values.

Every refusal is a ``ValueError`` whose message names the file and, for values, where in it (the readers'
``where``, e.g. ``annotation file a.json, images[3]``) and what was expected, so the train, evaluate and
inference actions report it in one sentence.
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any, Dict

import psutil

#: Memory ``json.loads`` needs per byte of a COCO-style file (measured: 3.7x on a 176 MiB file of polygons).
JSON_MEMORY_FACTOR = 4
#: Ids are int64 (numpy, torch, pycocotools); category ids also fill int32 semantic maps.
MAX_ID = 2 ** 63 - 1
MAX_CATEGORY_ID = 2 ** 31 - 1


def load_json_file(path: Path, *, describe: str) -> Any:
    """The parsed JSON of ``path``; ``describe`` starts every message (e.g. ``dataset.val.panoptic_json:
    annotation file``).

    Refused before reading: a file larger than a quarter of the memory available now. Refused while reading:
    text that is not UTF-8 (or UTF-16/32 with its BOM), nesting deeper than the JSON reader follows, numbers
    of more digits than Python converts, and malformed JSON.
    """
    size = os.stat(path).st_size
    available = psutil.virtual_memory().available
    if size * JSON_MEMORY_FACTOR > available:
        raise ValueError(f"{describe} {path} is {size / 2 ** 20:.0f} MiB; reading it needs about "
                         f"{size * JSON_MEMORY_FACTOR / 2 ** 20:.0f} MiB of memory and {available / 2 ** 20:.0f} MiB "
                         "are available (split the file, or run on a host with more memory)")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"{describe} {path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{describe} {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
                         f"{error.start} cannot be decoded") from None
    except RecursionError:
        raise ValueError(f"{describe} {path} nests arrays or objects deeper than the JSON reader follows") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{describe} {path} cannot be read: {error}") from None


def preview(value: Any) -> str:
    """A short repr of a value from a file (bounded in length and depth, whatever the value)."""
    return reprlib.repr(value)


def json_object(value: Any, *, where: str) -> Dict[str, Any]:
    """``value`` when it is a JSON object, else a ValueError naming ``where``."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__} {preview(value)}")
    return value


def json_int(value: Any, *, where: str, name: str, low: int = 0, high: int = MAX_ID) -> int:
    """``value`` as an int within ``low..high``: integers, or floats with no fractional part (some tools write
    ``3.0``); never booleans or strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{where}: '{name}' must be an integer, got {type(value).__name__} {preview(value)}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{where}: '{name}' is {number}, out of the range {low}..{high}")
    return number


def json_flag(value: Any, *, where: str, name: str) -> bool:
    """A 0/1 (or true/false) flag such as ``iscrowd``."""
    if value not in (0, 1):
        raise ValueError(f"{where}: '{name}' must be 0 or 1, got {preview(value)}")
    return bool(value)


def relative_file_name(value: Any, *, where: str, name: str) -> str:
    """A file name that stays inside the folder it is looked up in: a non-empty relative path without ``..``."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{where}: '{name}' must be a non-empty file name, got {preview(value)}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or os.path.isabs(value) or ".." in parts or (len(value) > 1 and value[1] == ":"):
        raise ValueError(f"{where}: '{name}' {value[:200]!r} must be a relative path inside the image folder (no "
                         "absolute path, no '..')")
    return value
