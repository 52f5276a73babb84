"""Hostile annotation files and label maps, through the train CLI: each is refused with one sentence naming
the file, the entry and what was expected, before any training (or, for masks decoded per sample, when the
sample is loaded), and nothing is written outside the job folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from hostile_support import Sandbox, assert_refused

PANOPTIC_JSON = "annotations_panoptic.json"
INSTANCE_JSON = "annotations.json"


def _edit(sandbox: Sandbox, fmt: str, change: Callable[[Dict[str, Any]], None]) -> Path:
    path = sandbox.train_root(fmt) / (PANOPTIC_JSON if fmt == "coco_panoptic" else INSTANCE_JSON)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _set(*keys, value):
    """A change that sets data[k0][k1]... to ``value``."""
    def change(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


# (format, change of the annotation file, pattern after "annotation file <path>")
FIELDS: Dict[str, tuple] = {
    "'images' is an object": ("coco", _set("images", value={"0": {}}), r": 'images' must be a list, got dict"),
    "an images entry is a string": ("coco", _set("images", 0, value="000000.jpg"),
                                    r", images\[0\]: expected an object, got str '000000.jpg'"),
    "image id is a string": ("coco", _set("images", 0, "id", value="0"),
                             r", images\[0\]: 'id' must be an integer, got str '0'"),
    "image id beyond int64": ("coco", _set("images", 0, "id", value=2 ** 64),
                              r", images\[0\]: 'id' is 18446744073709551616, out of the range 0..9223372036854775807"),
    "image height is negative": ("coco", _set("images", 0, "height", value=-64),
                                 r", images\[0\]: 'height' is -64, out of the range 1\.\."),
    "image declares 100000 x 100000 pixels": (
        "coco", lambda d: d["images"][0].update(height=100000, width=100000),
        r", images\[0\]: 100000x100000 is 10000000000 pixels, more than the 89478485 pixels images may have"),
    "file_name is an absolute path": ("coco", _set("images", 0, "file_name", value="/etc/passwd"),
                                      r", images\[0\]: 'file_name' '/etc/passwd' must be a relative path inside"),
    "file_name climbs out with '..'": (
        "coco", _set("images", 0, "file_name", value="../../../outside/sentinel.txt"),
        r", images\[0\]: 'file_name' '\.\./\.\./\.\./outside/sentinel.txt' must be a relative path inside"),
    "category_id is a list": ("coco", _set("annotations", 0, "category_id", value=[1]),
                              r", annotations\[0\]: 'category_id' must be an integer, got list \[1\]"),
    "category_id is negative": ("coco", _set("annotations", 0, "category_id", value=-1),
                                r", annotations\[0\]: 'category_id' is -1, out of the range 0..2147483647"),
    "iscrowd is a string": ("coco", _set("annotations", 0, "iscrowd", value="yes"),
                            r", annotations\[0\]: 'iscrowd' must be 0 or 1, got 'yes'"),
    "an annotations entry is a number": ("coco_panoptic", _set("annotations", 0, value=5),
                                         r", annotations\[0\]: expected an object, got int 5"),
    "segments_info is a string": ("coco_panoptic", _set("annotations", 0, "segments_info", value="all"),
                                  r", annotations\[0\]: 'segments_info' must be a list, got str"),
    "panoptic segment id beyond 24 bits": (
        "coco_panoptic", _set("annotations", 0, "segments_info", 0, "id", value=2 ** 24),
        r", annotations\[0\], segments_info\[0\]: 'id' is 16777216, out of the range 1..16777215"),
    "panoptic file_name is an absolute path": (
        "coco_panoptic", _set("annotations", 0, "file_name", value="/etc/hostname"),
        r", annotations\[0\]: 'file_name' '/etc/hostname' must be a relative path"),
}

# found when the sample's masks are decoded (the train action has started; the loader reports it)
SEGMENTATIONS: Dict[str, tuple] = {
    "polygon coordinate is a string": (
        [["1", 2, 30, 2, 30, 30]], r"annotation \d+: polygon coordinates must be finite numbers"),
    "uncompressed RLE counts do not add up": (
        {"size": [64, 64], "counts": [10, 5]},
        r"annotation \d+: RLE 'counts' must be non-negative integers adding up to 4096 \(height x width\)"),
    "compressed RLE counts run past the image": (
        {"size": [64, 64], "counts": "0W\\\\\\\\\\\\"}, r"annotation \d+: the RLE mask cannot be decoded"),
}


@pytest.mark.parametrize("case", list(FIELDS))
def test_a_malformed_field_is_refused_before_training(sandbox, case):
    fmt, change, pattern = FIELDS[case]
    path = _edit(sandbox, fmt, change)
    outcome = sandbox.run_cli("train", [], spec=sandbox.train_spec(fmt))
    assert_refused(outcome, "^dataset.train: annotation file " + str(path) + pattern, case=f"JSON: {case}",
                   door="train CLI")
    assert sorted(p.name for p in sandbox.job.iterdir()) == ["experiment.yaml", "status.json"]


@pytest.mark.parametrize("case", list(SEGMENTATIONS))
def test_a_malformed_mask_is_refused_when_its_sample_is_loaded(sandbox, case):
    segmentation, pattern = SEGMENTATIONS[case]
    path = _edit(sandbox, "coco", lambda data: [a.update(segmentation=segmentation) for a in data["annotations"]])
    outcome = sandbox.run_cli("train", [], spec=sandbox.train_spec("coco"))
    assert_refused(outcome, f"^dataset.train: annotation file {path}, {pattern}", case=f"JSON: {case}",
                   door="train CLI")
    assert not list(sandbox.job.glob("*.pth"))


def _sparse_terabyte(path: Path) -> str:
    with open(path, "wb") as handle:
        handle.truncate(1 << 40)  # a sparse file: 1 TiB long, no disk used
    return r"is 1048576 MiB; reading it needs about 4194304 MiB of memory and \d+ MiB are available"


# whole files, given as the panoptic annotation file
FILES: Dict[str, tuple] = {
    "a 1 TiB annotation file": _sparse_terabyte,
    "arrays nested 100000 deep": lambda p: (p.write_text("[" * 100000 + "]" * 100000),
                                            "nests arrays or objects deeper than the JSON reader follows")[1],
    "a number of 100000 digits": lambda p: (
        p.write_text('{"images": [], "annotations": [], "n": 1' + "0" * 100000 + "}"),
        "cannot be read: Exceeds the limit .* for integer string conversion")[1],
    "not UTF-8": lambda p: (p.write_bytes(b'{"images": [], "annotations": [], "info": "caf\xe9"}'),
                            r"is not UTF-8 text: byte 0xe9 at offset 46 cannot be decoded")[1],
    "a list at the top": lambda p: (
        p.write_text("[1, 2]"), r": expected a JSON object with \['images', 'annotations'\], got list")[1],
}


@pytest.mark.parametrize("case", list(FILES))
def test_a_hostile_annotation_file_is_refused_in_bounded_time_and_memory(sandbox, case):
    path = sandbox.train_root("coco_panoptic") / PANOPTIC_JSON
    pattern = FILES[case](path)
    outcome = sandbox.run_cli("train", [], spec=sandbox.train_spec("coco_panoptic"))
    assert_refused(outcome, f"^dataset.train(.panoptic_json)?: annotation file {path}:? ?{pattern}",
                   case=f"JSON: {case}", door="train CLI", max_seconds=60)


LABEL_MAPS: Dict[str, tuple] = {
    "label map id beyond int32": ([{"id": 2 ** 40, "name": "x"}], r"entry 0: 'id' must be in 0..2147483647"),
    "label map entry is a string": (["person"], r"entry 0: expected an object \{id, name, color, isthing\}, got "
                                                r"'person'"),
    "label map nested 100000 deep": (None, r"nests arrays or objects deeper than the JSON reader follows"),
}


@pytest.mark.parametrize("case", list(LABEL_MAPS))
def test_a_hostile_label_map_is_refused(sandbox, case):
    content, pattern = LABEL_MAPS[case]
    path = sandbox.train_root("coco_panoptic") / "label_map_panoptic.json"
    path.write_text("[" * 100000 + "]" * 100000 if content is None else json.dumps(content))
    outcome = sandbox.run_cli("train", [], spec=sandbox.train_spec("coco_panoptic"))
    assert_refused(outcome, f"^dataset.train: label map {path},? {pattern}", case=f"JSON: {case}", door="train CLI")
    assert os.path.getsize(path) > 0
