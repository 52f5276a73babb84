"""Hostile images and label PNGs. Refusals go through the train CLI (the image is one of dataset.train's, found
when its sample is loaded): decompression bombs are refused from the header, before any pixel is decoded;
truncated files and label PNGs of the wrong size are refused naming the file. 16-bit and CMYK images are what
users expect to work: they are accepted and converted to 8-bit RGB (inference on a folder of such photos)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation_support import save_random_checkpoint, small_data_overrides, tiny_model_overrides
from hostile_support import Sandbox, assert_refused, png_bytes, record_accepted
from mask2former.data.images import load_rgb
from mask2former.results import read_status


def _first(sandbox: Sandbox, fmt: str, folder: str) -> Path:
    """The file of the first image (folder 'images') or panoptic PNG (folder 'images_panoptic')."""
    root = sandbox.train_root(fmt)
    annotations = "annotations_panoptic.json" if fmt == "coco_panoptic" else "annotations.json"
    data = json.loads((root / annotations).read_text())
    entries = data["images"] if folder == "images" else data["annotations"]
    return root / folder / entries[0]["file_name"]


def _jpeg(mode: str = "RGB", size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (0, 200, 200, 0)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _rows16(values: np.ndarray) -> bytes:
    """Filtered scanlines (filter 0) of a big-endian 16-bit image [H, W, C]."""
    return b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)


IMAGES = {
    "decompression bomb: a 30000 x 30000 PNG of 113 KB": (
        "images", lambda: png_bytes(30000, 30000, bit_depth=1, color_type=0),
        r"image {path} is refused as a decompression bomb: Image size \(900000000 pixels\) exceeds limit"),
    "a 10000 x 10000 PNG, over the pixel limit but under Pillow's own refusal": (
        "images", lambda: png_bytes(10000, 10000, bit_depth=1, color_type=0),
        r"image {path} is 10000x10000 \(100000000 pixels\), more than the 89478485 pixels images may have"),
    "truncated JPEG": ("images", lambda: _jpeg()[:400],
                       r"image {path} could not be read: (image file is truncated|Truncated File Read)"),
    "truncated PNG": ("images", lambda: png_bytes(64, 64)[:60], r"image {path} could not be read: "),
    "panoptic PNG bomb": (
        "images_panoptic", lambda: png_bytes(30000, 30000, bit_depth=1, color_type=0),
        r"panoptic PNG {path} is refused as a decompression bomb"),
    "truncated panoptic PNG": ("images_panoptic", lambda: png_bytes(64, 64)[:60],
                               r"panoptic PNG {path} could not be read: "),
    "panoptic PNG of the wrong size": (
        "images_panoptic", lambda: png_bytes(32, 48),
        r"panoptic PNG {path} is 32x48 but annotation file .* says image \d+ is 64x64"),
}


@pytest.mark.parametrize("case", list(IMAGES))
def test_a_hostile_image_is_refused_naming_it(sandbox, case):
    folder, content, pattern = IMAGES[case]
    path = _first(sandbox, "coco_panoptic", folder)
    path.write_bytes(content())
    outcome = sandbox.run_cli("train", [], spec=sandbox.train_spec("coco_panoptic"))
    assert_refused(outcome, "^dataset.train: " + pattern.format(path=path), case=f"image: {case}", door="train CLI",
                   max_seconds=180)
    assert not list(sandbox.job.glob("*.pth"))


def test_16_bit_and_cmyk_images_are_accepted_and_converted(sandbox, tmp_path):
    photos = sandbox.data / "photos"
    photos.mkdir()
    gray = np.array([[0, 257 * 100, 65535, 65535]] * 4, dtype=np.uint16)
    rgb = np.zeros((4, 4, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 257 * 128
    files = {
        "cmyk.jpg": _jpeg("CMYK", (48, 40)),
        "gray16.png": png_bytes(4, 4, bit_depth=16, color_type=0, rows=_rows16(gray[..., None])),
        "rgb16.png": png_bytes(4, 4, bit_depth=16, color_type=2, rows=_rows16(rgb)),
    }
    for name, data in files.items():
        (photos / name).write_bytes(data)
    # what each becomes: 8-bit RGB with the values users see in an image viewer
    assert load_rgb(photos / "gray16.png")[0, :, 0].tolist() == [0, 100, 255, 255]
    assert load_rgb(photos / "rgb16.png")[0, 0].tolist() == [255, 0, 128]
    cmyk = load_rgb(photos / "cmyk.jpg")
    assert cmyk.shape == (40, 48, 3) and abs(int(cmyk[20, 24, 0]) - 255) <= 8 and cmyk[20, 24, 1:].max() <= 60

    checkpoint = save_random_checkpoint(tmp_path / "model.pth", mode="panoptic")
    words = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in {
        **tiny_model_overrides("panoptic"), **small_data_overrides(), "dataset.test.img_dir": str(photos),
        "dataset.label_map": str(sandbox.train_root("coco_panoptic") / "label_map_panoptic.json"),
        "inference.checkpoint": str(checkpoint), "inference.save_overlays": False}.items()]
    outcome = sandbox.run_cli("inference", words)
    assert outcome.code == 0, outcome.output[-3000:]
    assert read_status(sandbox.job)[-1]["status"] == "SUCCESS"
    written = sorted(p.name for p in (sandbox.job / "panoptic").glob("*.png"))
    assert written == ["cmyk.png", "gray16.png", "rgb16.png"]
    assert outcome.changed_outside == {}
    for name, what in (("CMYK JPEG", "converted to RGB by Pillow (no colour management)"),
                       ("16-bit grayscale PNG", "scaled from 0..65535 to 0..255 gray"),
                       ("16-bit RGB PNG", "read by Pillow as 8-bit RGB (the high byte)")):
        record_accepted(f"image: {name}", "inference CLI", what)


def test_a_decompression_bomb_among_inference_photos_is_refused_naming_it(sandbox, tmp_path):
    photos = sandbox.data / "photos"
    photos.mkdir()
    (photos / "ok.jpg").write_bytes(_jpeg())
    bomb = photos / "zz-bomb.png"
    bomb.write_bytes(png_bytes(30000, 30000, bit_depth=1, color_type=0))
    checkpoint = save_random_checkpoint(tmp_path / "model.pth", mode="panoptic")
    words = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in {
        **tiny_model_overrides("panoptic"), **small_data_overrides(), "dataset.test.img_dir": str(photos),
        "dataset.label_map": str(sandbox.train_root("coco_panoptic") / "label_map_panoptic.json"),
        "inference.checkpoint": str(checkpoint), "inference.save_overlays": False}.items()]
    outcome = sandbox.run_cli("inference", words)
    assert_refused(outcome, rf"image {bomb} is refused as a decompression bomb", case="image: bomb among photos",
                   door="inference CLI", max_seconds=180)
    assert read_status(sandbox.job)[-1]["status"] == "FAILURE"
