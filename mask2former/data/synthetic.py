"""Synthetic segmentation datasets in the exact data-source layout, for tests, demos and benchmarks.

Usage::

    python -m mask2former.data.synthetic OUT --format {coco,coco_panoptic,ade} --images N --size S --seed K
                                             [--val-images M]

Without ``--val-images`` one dataset root is written to OUT; with it, two roots: OUT/train (N images)
and OUT/val (M other images drawn from the same seed), ready to be named as ``train_datasets`` and
``eval_dataset``. A root holds:

- coco:          images.tar.gz, annotations.json, label_map.json (thing classes)
- coco_panoptic: images.tar.gz, annotations_panoptic.json, images_panoptic.tar.gz,
                 label_map_panoptic.json (stuff and thing classes), and annotations.json (the things
                 as COCO instances, so mask AP can be computed)
- ade:           images.tar.gz, root.tar.gz (images/NNNNNN.jpg and annotations/NNNNNN.png: 8-bit label PNGs
                 whose values are category ids, 0 unlabelled), annotations.jsonl ({"img", "segm"} per line,
                 relative to root.tar.gz's folder), label_map.json, and annotations.json (the things as COCO
                 instances)

Each S x S image has textured stuff regions (sky at the top, ground and/or water below a wavy
horizon) and 1-5 things (circles, rectangles, triangles) in class-specific colours with noise, of
random sizes, occluding each other. Some images hold a crowd (a cluster of small circles, iscrowd 1);
visible fragments under 8 pixels are left unlabelled (void). Category ids are not contiguous
(1, 2, 3, 7, 9, 12). The same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from .coco_panoptic import id_to_rgb

FORMATS = ("coco", "coco_panoptic", "ade")
STUFF = ({"id": 1, "name": "sky", "color": [110, 170, 235], "isthing": 0},
         {"id": 2, "name": "ground", "color": [125, 95, 55], "isthing": 0},
         {"id": 3, "name": "water", "color": [30, 95, 125], "isthing": 0})
THINGS = ({"id": 7, "name": "circle", "color": [225, 35, 35], "isthing": 1},
          {"id": 9, "name": "rectangle", "color": [245, 210, 20], "isthing": 1},
          {"id": 12, "name": "triangle", "color": [170, 40, 210], "isthing": 1})
CIRCLE, RECTANGLE, TRIANGLE = (thing["id"] for thing in THINGS)
MIN_VISIBLE_PIXELS = 8
SEGMENT_ID_STRIDE = 10000  # segment id = category id * stride + n: exercises all three PNG channels


@dataclass
class SyntheticSegment:
    segment_id: int
    category_id: int
    iscrowd: bool
    mask: np.ndarray  # bool [S, S]


# ---------------------------------------------------------------- drawing
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))


def _stuff_layout(rng: np.random.Generator, size: int) -> Dict[int, np.ndarray]:
    """Masks of the stuff classes present: sky above a wavy horizon, ground and/or water below."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.25, 0.5) + 0.04 * np.sin(2 * np.pi * (xs * rng.uniform(0.5, 2.0) + rng.uniform()))
    sky = ys < horizon
    below = ~sky
    choice = rng.random()
    if choice < 0.35:
        return {1: sky, 2: below}
    if choice < 0.6:
        return {1: sky, 3: below}
    boundary = rng.uniform(0.3, 0.7) + 0.05 * np.sin(2 * np.pi * (ys * rng.uniform(1.0, 3.0) + rng.uniform()))
    water_left = rng.random() < 0.5
    water = below & ((xs < boundary) if water_left else (xs >= boundary))
    return {1: sky, 2: below & ~water, 3: water}


def _paint_stuff(rng: np.random.Generator, image: np.ndarray, layout: Dict[int, np.ndarray]) -> None:
    size = image.shape[0]
    ys = np.arange(size, dtype=np.float32)[:, None] / size
    colors = {c["id"]: np.array(c["color"], dtype=np.float32) for c in STUFF}
    for category_id, mask in layout.items():
        if category_id == 1:  # sky: vertical gradient and faint clouds
            texture = (ys - 0.5)[..., None] * 60.0 + 18.0 * _smooth_noise(rng, size, 6)[..., None]
        elif category_id == 2:  # ground: blotches
            texture = 30.0 * _smooth_noise(rng, size, 12)[..., None]
        else:  # water: horizontal ripples
            phase = rng.uniform(0, 2 * np.pi)
            texture = (14.0 * np.sin(ys * size * rng.uniform(0.3, 0.6) + phase)
                       + 10.0 * _smooth_noise(rng, size, 8))[..., None]
        image[mask] = (colors[category_id] + texture)[mask]
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)


def _shape_mask(rng: np.random.Generator, category_id: int, size: int, *, radius: float,
                center: Tuple[float, float]) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = center
    if category_id == CIRCLE:
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
    if category_id == RECTANGLE:
        half_h, half_w = radius * rng.uniform(0.6, 1.2), radius * rng.uniform(0.6, 1.2)
        return (np.abs(ys - cy) <= half_h) & (np.abs(xs - cx) <= half_w)
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    vy, vx = cy + radius * 1.3 * np.sin(angles), cx + radius * 1.3 * np.cos(angles)
    inside = np.ones((size, size), dtype=bool)
    for i in range(3):  # same side of each edge as the opposite vertex
        j, k = (i + 1) % 3, (i + 2) % 3
        edge = (vx[j] - vx[i]) * (ys - vy[i]) - (vy[j] - vy[i]) * (xs - vx[i])
        reference = (vx[j] - vx[i]) * (vy[k] - vy[i]) - (vy[j] - vy[i]) * (vx[k] - vx[i])
        inside &= edge * np.sign(reference) >= 0
    return inside


def _paint_thing(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, category_id: int) -> None:
    color = np.array(next(c["color"] for c in THINGS if c["id"] == category_id), dtype=np.float32)
    shade = color * rng.uniform(0.85, 1.1) + rng.normal(0.0, 10.0, (int(mask.sum()), 3)).astype(np.float32)
    image[mask] = shade


def render_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[SyntheticSegment]]:
    """One synthetic image (uint8 [S, S, 3]) and its non-overlapping segments (visible parts)."""
    image = np.zeros((size, size, 3), dtype=np.float32)
    layout = _stuff_layout(rng, size)
    _paint_stuff(rng, image, layout)
    owner = np.zeros((size, size), dtype=np.int32)  # segment id owning each pixel, 0 = void
    categories: Dict[int, Tuple[int, bool]] = {}
    for category_id, mask in layout.items():
        segment_id = category_id * SEGMENT_ID_STRIDE + 1
        owner[mask] = segment_id
        categories[segment_id] = (category_id, False)
    counters = {thing["id"]: 0 for thing in THINGS}
    if rng.random() < 0.15:  # a crowd: a cluster of small circles, one segment
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        crowd = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(5, 10))):
            offset = rng.normal(0.0, 0.06 * size, 2)
            crowd |= _shape_mask(rng, CIRCLE, size, radius=0.025 * size + 1.5,
                                 center=(cy + offset[0], cx + offset[1]))
        _paint_thing(rng, image, crowd, CIRCLE)
        counters[CIRCLE] += 1
        segment_id = CIRCLE * SEGMENT_ID_STRIDE + counters[CIRCLE]
        owner[crowd] = segment_id
        categories[segment_id] = (CIRCLE, True)
    for _ in range(int(rng.integers(1, 6))):
        category_id = THINGS[int(rng.integers(len(THINGS)))]["id"]
        radius = rng.uniform(0.06, 0.2) * size
        center = (rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size)
        mask = _shape_mask(rng, category_id, size, radius=radius, center=center)
        if not mask.any():
            continue
        _paint_thing(rng, image, mask, category_id)
        counters[category_id] += 1
        segment_id = category_id * SEGMENT_ID_STRIDE + counters[category_id]
        owner[mask] = segment_id
        categories[segment_id] = (category_id, False)
    ids, counts = np.unique(owner, return_counts=True)
    segments = []
    for segment_id, count in zip(ids.tolist(), counts.tolist()):
        if segment_id == 0:
            continue
        if count < MIN_VISIBLE_PIXELS:  # a sliver left by occlusion: unlabelled
            owner[owner == segment_id] = 0
            continue
        category_id, iscrowd = categories[segment_id]
        segments.append(SyntheticSegment(segment_id=segment_id, category_id=category_id, iscrowd=iscrowd,
                                         mask=owner == segment_id))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), segments


# ---------------------------------------------------------------- files
def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    else:
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_tar_gz(path: Path, members: Sequence[Tuple[str, bytes]]) -> None:
    """A byte-reproducible .tar.gz: fixed mtimes, owners and order; members at the archive root."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _rle(mask: np.ndarray, *, compressed: bool) -> dict:
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # COCO: column-major runs, the first one counting zeros
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _instance_annotation(segment: SyntheticSegment, *, annotation_id: int, image_id: int) -> dict:
    rle = mask_util.encode(np.asfortranarray(segment.mask.astype(np.uint8)))
    return {"id": annotation_id, "image_id": image_id, "category_id": segment.category_id,
            "iscrowd": int(segment.iscrowd), "area": float(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            # COCO convention: crowd regions as uncompressed RLE, single objects compressed
            "segmentation": _rle(segment.mask, compressed=not segment.iscrowd)}


def write_dataset(out_dir: str | Path, *, dataset_format: str, num_images: int, size: int, seed: int,
                  stream: int = 0) -> Path:
    """Write one dataset root. ``stream`` selects an independent sequence of images for the same seed
    (0: train, 1: val)."""
    if dataset_format not in FORMATS:
        raise ValueError(f"--format {dataset_format!r} is not one of {list(FORMATS)}")
    if num_images < 1 or size < 32:
        raise ValueError(f"need --images >= 1 and --size >= 32, got {num_images} and {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpegs, pngs, images, instances, panoptic, ade_lines = [], [], [], [], [], []
    for index in range(num_images):
        image_id = index + 1
        rng = np.random.default_rng([seed, stream, index])
        pixels, segments = render_image(rng, size)
        file_name = f"{image_id:06d}.jpg"
        jpegs.append((file_name, _encode(pixels, "JPEG")))
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for segment in segments:
            if segment.category_id in {t["id"] for t in THINGS}:
                instances.append(_instance_annotation(segment, annotation_id=len(instances) + 1, image_id=image_id))
        if dataset_format == "coco_panoptic":
            ids = np.zeros((size, size), dtype=np.int64)
            for segment in segments:
                ids[segment.mask] = segment.segment_id
            png_name = f"{image_id:06d}.png"
            pngs.append((png_name, _encode(id_to_rgb(ids), "PNG")))
            panoptic.append({"image_id": image_id, "file_name": png_name, "segments_info": [
                {"id": s.segment_id, "category_id": s.category_id, "iscrowd": int(s.iscrowd),
                 "area": int(s.mask.sum()), "bbox": _bbox(s.mask)} for s in segments]})
        if dataset_format == "ade":
            labels = np.zeros((size, size), dtype=np.uint8)  # 0: unlabelled, as crowds are here
            for segment in segments:
                if not segment.iscrowd:
                    labels[segment.mask] = segment.category_id
            pngs.append((f"annotations/{image_id:06d}.png", _encode(labels, "PNG")))
            ade_lines.append({"img": f"images/{file_name}", "segm": f"annotations/{image_id:06d}.png"})
    _write_tar_gz(out / "images.tar.gz", jpegs)
    things = [dict(thing) for thing in THINGS]
    _write_json(out / "annotations.json", {"images": images, "annotations": instances, "categories": things})
    if dataset_format == "coco":
        _write_json(out / "label_map.json", things)
    elif dataset_format == "ade":
        _write_tar_gz(out / "root.tar.gz", [(f"images/{name}", data) for name, data in jpegs] + pngs)
        (out / "annotations.jsonl").write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in ade_lines),
                                               encoding="utf-8")
        _write_json(out / "label_map.json", [dict(c) for c in STUFF + THINGS])
    else:
        categories = [dict(c) for c in STUFF + THINGS]
        _write_tar_gz(out / "images_panoptic.tar.gz", pngs)
        _write_json(out / "annotations_panoptic.json",
                    {"images": images, "annotations": panoptic, "categories": categories})
        _write_json(out / "label_map_panoptic.json", categories)
    return out


def _bbox(mask: np.ndarray) -> List[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def generate(out_dir: str | Path, *, dataset_format: str, num_images: int, size: int, seed: int,
             val_images: Optional[int] = None) -> Dict[str, Path]:
    """Write OUT (no ``val_images``) or OUT/train + OUT/val; returns {"train": root[, "val": root]}."""
    out = Path(out_dir)
    if val_images is None:
        return {"train": write_dataset(out, dataset_format=dataset_format, num_images=num_images, size=size,
                                       seed=seed)}
    return {"train": write_dataset(out / "train", dataset_format=dataset_format, num_images=num_images, size=size,
                                   seed=seed, stream=0),
            "val": write_dataset(out / "val", dataset_format=dataset_format, num_images=val_images, size=size,
                                 seed=seed, stream=1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.data.synthetic",
                                     description="Write a synthetic COCO, COCO-panoptic or ADE dataset root.")
    parser.add_argument("out", help="output folder (created); with --val-images, OUT/train and OUT/val")
    parser.add_argument("--format", dest="dataset_format", choices=FORMATS, default="coco_panoptic")
    parser.add_argument("--images", type=int, default=32, help="number of (training) images")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-images", type=int, default=None,
                        help="also write a validation root of this many images (then OUT/train and OUT/val)")
    args = parser.parse_args(argv)
    try:
        roots = generate(args.out, dataset_format=args.dataset_format, num_images=args.images, size=args.size,
                         seed=args.seed, val_images=args.val_images)
    except ValueError as error:
        parser.error(str(error))
    for split, root in roots.items():
        print(f"{split}: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
