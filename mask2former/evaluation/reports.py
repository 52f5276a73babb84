"""What an evaluation leaves in the results folder besides metrics.json: per-class CSV tables, a per-class
IoU bar chart, and the kpi of the SUCCESS status line.

Inputs are the dicts of :meth:`mask2former.evaluation.pipeline.Evaluator.compute` (percent values, nan
where undefined). metrics.json must be strict JSON, so :func:`finite_or_none` turns nan into null.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..results import atomic_write_bytes, atomic_write_text

KPI_KEYS = ("mIoU", "PQ", "AP")
IOU_TABLE = "per_class_iou.csv"
PQ_TABLE = "per_class_pq.csv"
AP_TABLE = "per_class_ap.csv"
IOU_CHART = "per_class_iou.png"
# Per-class IoU chart layout, pixels: font size, row height, bar length at 100 %, outer margin.
_CHART_FONT, _CHART_ROW, _CHART_WIDTH, _CHART_MARGIN = 12, 20, 500, 8


def finite_or_none(value: Any) -> Any:
    """nan/inf -> None, recursively through dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def kpi(metrics: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """{mIoU, PQ, AP} for those that were computed and are defined; None when none is."""
    values = {key: float(metrics[key]) for key in KPI_KEYS
              if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])}
    return values or None


def _csv_text(header: List[str], rows: List[List[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else
                         (round(v, 4) if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


def write_per_class_tables(folder: Path, metrics: Dict[str, Any]) -> Dict[str, Path]:
    """per_class_iou.csv, per_class_pq.csv, per_class_ap.csv for the metric groups present; empty cells
    where a value is undefined. Returns {table name: path}."""
    per_class = metrics.get("per_class", {})
    written: Dict[str, Path] = {}
    if "semantic" in per_class:
        rows = [[name, v["iou"], v["acc"]] for name, v in per_class["semantic"].items()]
        written[IOU_TABLE] = _write(folder / IOU_TABLE, _csv_text(["class", "IoU", "accuracy"], rows))
    if "panoptic" in per_class:
        rows = [[name, int(v["isthing"]), v["PQ"], v["SQ"], v["RQ"], v["TP"], v["FP"], v["FN"]]
                for name, v in per_class["panoptic"].items()]
        written[PQ_TABLE] = _write(folder / PQ_TABLE, _csv_text(
            ["class", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN"], rows))
    if "instance" in per_class:
        rows = [[name, v["AP"]] for name, v in per_class["instance"].items()]
        written[AP_TABLE] = _write(folder / AP_TABLE, _csv_text(["class", "AP"], rows))
    return written


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def plot_per_class_iou(path: Path, per_class_iou: Dict[str, Dict[str, float]], *, title: str) -> Path:
    """Horizontal bar chart of the defined per-class IoUs (classes absent from both ground truth and
    prediction are left out), drawn with Pillow and written as PNG.

    Pillow rather than matplotlib: importing matplotlib's figure machinery alone takes about 1.6 s on a
    2-core host, more than scoring 500 images."""
    from PIL import Image, ImageDraw, ImageFont

    items = [(name, v["iou"]) for name, v in per_class_iou.items() if math.isfinite(v["iou"])]
    font = ImageFont.load_default(size=_CHART_FONT)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([measure.textlength(name, font=font) for name, _ in items] or [0.0])
    left = int(label_width) + 2 * _CHART_MARGIN
    top, bar_area = 2 * _CHART_ROW, _CHART_WIDTH
    height = top + _CHART_ROW * max(len(items), 1) + 2 * _CHART_ROW
    image = Image.new("RGB", (left + bar_area + 2 * _CHART_MARGIN, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, _CHART_ROW), title, fill="black", font=font, anchor="mm")
    bottom = top + _CHART_ROW * max(len(items), 1)
    for tick in range(0, 101, 20):  # the x axis, 0..100 %
        x = left + bar_area * tick / 100
        draw.line([(x, top), (x, bottom)], fill="#dddddd")
        draw.text((x, bottom + 4), str(tick), fill="black", font=font, anchor="mt")
    draw.text((left + bar_area / 2, bottom + _CHART_ROW + 4), "IoU (%)", fill="black", font=font, anchor="mt")
    if not items:
        draw.text((left + bar_area / 2, top + _CHART_ROW / 2), "no class present", fill="black", font=font,
                  anchor="mm")
    for row, (name, value) in enumerate(items):
        y = top + row * _CHART_ROW
        draw.rectangle([(left, y + 3), (left + bar_area * min(max(value, 0.0), 100.0) / 100, y + _CHART_ROW - 3)],
                       fill="#4c72b0")
        draw.text((left - _CHART_MARGIN, y + _CHART_ROW / 2), name, fill="black", font=font, anchor="rm")
    draw.rectangle([(left, top), (left + bar_area, bottom)], outline="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_reports(folder: Path, metrics: Dict[str, Any]) -> Dict[str, Path]:
    """Every per-class artefact of an evaluation: the CSV tables and, with semantic results, the chart."""
    written = write_per_class_tables(folder, metrics)
    per_class = metrics.get("per_class", {})
    if "semantic" in per_class:
        title = f"Per-class IoU (mIoU {metrics['mIoU']:.2f}%)" if math.isfinite(metrics.get("mIoU", math.nan)) \
            else "Per-class IoU"
        written[IOU_CHART] = plot_per_class_iou(folder / IOU_CHART, per_class["semantic"], title=title)
    return written


def summary_line(metrics: Dict[str, Any]) -> str:
    """'mIoU 41.20, PQ 30.11, AP 25.00 on 500 images' from the computed groups."""
    parts = [f"{key} {metrics[key]:.2f}" for key in KPI_KEYS
             if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])]
    return (", ".join(parts) or "no defined metric") + f" on {metrics.get('num_images', 0)} images"
