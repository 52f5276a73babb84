"""Image loading: every mode and orientation ends as the RGB uint8 picture a person would see."""

import numpy as np
import pytest
from PIL import Image

from mask2former.data.images import list_images, load_rgb


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgb_roundtrip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    loaded = load_rgb(_save(tmp_path, "a.png", Image.fromarray(pixels)))
    assert loaded.dtype == np.uint8 and loaded.shape == (6, 9, 3)
    np.testing.assert_array_equal(loaded, pixels)


def test_grayscale_repeats_the_channel(tmp_path):
    gray = np.arange(40, dtype=np.uint8).reshape(5, 8) * 6
    loaded = load_rgb(_save(tmp_path, "g.png", Image.fromarray(gray, mode="L")))
    assert loaded.shape == (5, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], gray)


def test_palette_images_use_the_palette(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    loaded = load_rgb(_save(tmp_path, "p.png", image))
    np.testing.assert_array_equal(loaded[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(loaded[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(loaded[1, 0], [0, 0, 255])
    transparent = _save(tmp_path, "pt.png", image, transparency=1)
    np.testing.assert_array_equal(load_rgb(transparent)[0, 1], [0, 255, 0])


def test_alpha_is_dropped_not_blended(tmp_path):
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: colour must survive
    loaded = load_rgb(_save(tmp_path, "a.png", Image.fromarray(rgba, mode="RGBA")))
    assert loaded.shape == (3, 3, 3)
    assert (loaded[..., 0] == 200).all() and (loaded[..., 1:] == 0).all()


def test_sixteen_bit_is_scaled_to_eight_bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "d.png", Image.fromarray(values))
    loaded = load_rgb(path)
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    loaded = load_rgb(_save(tmp_path, "c.jpg", image))
    assert loaded.shape == (4, 4, 3)
    assert loaded[..., 0].min() > 200 and loaded[..., 1:].max() < 60


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall; left half red
    stored[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    loaded = load_rgb(_save(tmp_path, "r.jpg", Image.fromarray(stored), exif=exif.tobytes(), quality=95))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:18, :, 0].min() > 200  # the left half is on top after the rotation
    assert loaded[22:, :, 0].max() < 60


def test_unreadable_and_missing_files(tmp_path):
    broken = tmp_path / "x.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.jpg could not be read"):
        load_rgb(broken)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_list_images_any_case_sorted_and_recursive(tmp_path):
    tiny = Image.new("RGB", (2, 2))
    for name in ("b.JPG", "a.jpeg", "c.Png", "sub/d.PNG", "notes.txt", ".hidden/e.jpg"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            path.write_text("x")
        else:
            tiny.save(path, format="PNG")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.jpeg", "b.JPG", "c.Png", "sub/d.PNG"]
