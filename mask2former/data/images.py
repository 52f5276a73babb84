"""Robust image loading: every file becomes an RGB uint8 array of shape [H, W, 3].

Handles grayscale (L, 1), palette (P, PA), alpha (LA, RGBA: alpha dropped), CMYK/YCbCr (Pillow's
conversion, no colour management), 16-bit and 32-bit integer images (scaled from 0..65535 to 0..255; Pillow
reads 16-bit RGB(A) PNGs as 8-bit RGB(A)) and EXIF orientation (the array is returned as the image is meant
to be seen, which is also how annotation tools show it).

An image larger than Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 megapixels by default) is refused from its
header, before any pixel is decoded (:func:`open_image`): a decompression bomb of a few hundred bytes can
declare billions of pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_file(path: str | Path) -> bool:
    """True for .jpg/.jpeg/.png in any letter case."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> List[Path]:
    """All image files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*")
             if p.is_file() and is_image_file(p)
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _high_bit_depth_to_rgb(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    gray = np.rint(scaled).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a PIL image (already EXIF-transposed) to RGB uint8 [H, W, 3]."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _high_bit_depth_to_rgb(image)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.rint(np.clip(values * scale, 0, 255)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


class ImageTooLargeError(InputFileError):
    """An image whose header declares more pixels than Pillow's limit; the message names the file."""


def open_image(path: str | Path, *, what: str = "image") -> Image.Image:
    """``Image.open`` (lazy: nothing decoded yet) of an image no larger than ``Image.MAX_IMAGE_PIXELS``.

    Raises :class:`ImageTooLargeError` naming ``what`` and ``path`` otherwise; the caller closes the image.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # Pillow's own refusal, above twice its limit
        raise ImageTooLargeError(f"{what} {path} is refused as a decompression bomb: {error}") from None
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        image.close()
        raise ImageTooLargeError(f"{what} {path} is {width}x{height} ({width * height} pixels), more than the "
                                 f"{limit} pixels images may have (a decompression bomb, or an image to downscale "
                                 "or tile first)")
    return image


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3], EXIF orientation applied."""
    path = Path(path)
    try:
        with open_image(path) as image:
            image.load()
            transposed = ImageOps.exif_transpose(image)
            return to_rgb_array(transposed if transposed is not None else image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"image {path} could not be read: {error}") from error

