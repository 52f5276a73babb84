"""Mask2Former job folders under a local results root, read for the plugin's pages (no Airflow import).

A job folder is ``<root>/<dag_id>/<run_id>/<task_id>`` holding status.json (and, when finished,
metrics.json and ``_FINISHED``). Pages are plain HTML with inline SVG charts: no JavaScript, no assets.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
FINISHED_MARKER = "_FINISHED"
#: Metrics shown as columns of the job list, when a job has them.
HEADLINE_METRICS = ("mIoU", "PQ", "AP", "pixel_accuracy")
#: Depth of job folders under the root (dag / run / task).
JOB_DEPTH = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
SERVED_SUFFIXES = IMAGE_SUFFIXES + (".json", ".yaml", ".txt", ".log")


@dataclass
class JobSummary:
    job_id: str
    folder: Path
    action: Optional[str]
    status: Optional[str]
    message: str
    updated: str
    finished: bool
    metrics: Dict[str, Any] = field(default_factory=dict)
    status_lines: List[Dict[str, Any]] = field(default_factory=list)


def _read_lines(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def flatten_scalars(data: Any, prefix: str = "", depth: int = 0) -> Dict[str, Any]:
    """Numbers and strings of a metrics document under dotted keys (lists and deep tables left out)."""
    flat: Dict[str, Any] = {}
    if not isinstance(data, dict) or depth > 3:
        return flat
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_scalars(value, name + ".", depth + 1))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def headline(metrics: Dict[str, Any], name: str) -> Optional[float]:
    if isinstance(metrics.get(name), (int, float)):
        return metrics[name]
    hits = [v for k, v in metrics.items() if k.endswith("." + name) and isinstance(v, (int, float))]
    return hits[0] if hits else None


def read_job(root: Path, folder: Path) -> JobSummary:
    lines = _read_lines(folder / STATUS_FILE)
    metrics_path = folder / METRICS_FILE
    try:
        metrics = flatten_scalars(json.loads(metrics_path.read_text())) if metrics_path.is_file() else {}
    except json.JSONDecodeError:
        metrics = {}
    last = lines[-1] if lines else {}
    first_message = lines[0].get("message", "") if lines else ""
    action = first_message.split(" ", 1)[0] if first_message.endswith("started") else None
    return JobSummary(job_id=folder.relative_to(root).as_posix(), folder=folder, action=action,
                      status=last.get("status"), message=str(last.get("message", "")),
                      updated=f"{last.get('date', '')} {last.get('time', '')}".strip(),
                      finished=(folder / FINISHED_MARKER).is_file(), metrics=metrics, status_lines=lines)


def list_jobs(root: Path) -> List[JobSummary]:
    """Every job folder under ``root`` (depth dag/run/task), newest first."""
    if not root.is_dir():
        return []
    folders = [p.parent for p in root.glob("/".join(["*"] * JOB_DEPTH) + "/" + STATUS_FILE)]
    jobs = [read_job(root, f) for f in folders]
    return sorted(jobs, key=lambda j: (j.updated, j.job_id), reverse=True)


def job_folder(root: Path, job: str) -> Optional[Path]:
    """The folder of ``job`` inside ``root``, or None (unknown job, or a path leaving the root)."""
    candidate = (root / job).resolve()
    if root.resolve() not in candidate.parents or not (candidate / STATUS_FILE).is_file():
        return None
    return candidate


def served_file(root: Path, relative: str) -> Optional[Path]:
    """A file of a job folder that the page may serve (images, JSON, YAML, text), or None."""
    candidate = (root / relative).resolve()
    if root.resolve() not in candidate.parents or not candidate.is_file():
        return None
    if candidate.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return candidate


def series(lines: List[Dict[str, Any]]) -> Dict[str, List[Tuple[float, float]]]:
    """Numeric kpi values of the status lines by epoch (or line number): one series per kpi name."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    for index, line in enumerate(lines):
        kpi = line.get("kpi")
        if not isinstance(kpi, dict):
            continue
        x = line.get("epoch") if isinstance(line.get("epoch"), (int, float)) else index
        for name, value in kpi.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.setdefault(name, []).append((float(x), float(value)))
    return out


def svg_chart(name: str, points: List[Tuple[float, float]], width: int = 360, height: int = 180) -> str:
    """A small line chart (inline SVG) of one series."""
    pad = 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    coords = [(pad + (x - x0) * sx, height - pad - (y - y0) * sy) for x, y in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coords)
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(name)}">'
            f'<text x="{pad}" y="18" class="title">{html.escape(name)}</text>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
            f'<text x="4" y="{pad + 4}" class="tick">{y1:.4g}</text>'
            f'<text x="4" y="{height - pad}" class="tick">{y0:.4g}</text>'
            f'<text x="{pad}" y="{height - pad + 16}" class="tick">{x0:g}</text>'
            f'<text x="{width - pad - 12}" y="{height - pad + 16}" class="tick">{x1:g}</text>'
            f'<polyline points="{path}" class="line"/>{dots}</svg>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222} table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;font-size:.9rem} th{background:#f3f3f3}
.SUCCESS{color:#2a7d2a}.FAILURE{color:#b00020}.RUNNING,.STARTED{color:#a06000}
.chart{border:1px solid #ddd;margin:.25rem}.chart .line{fill:none;stroke:#76b900;stroke-width:2}
.chart circle{fill:#76b900}.chart .axis{stroke:#888}.chart .title{font-size:12px;font-weight:bold}
.chart .tick{font-size:10px;fill:#555} img.result{max-width:480px;border:1px solid #ddd;margin:.25rem}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_list(root: Path, jobs: List[JobSummary], base: str) -> str:
    heads = "".join(f"<th>{m}</th>" for m in HEADLINE_METRICS)
    rows = []
    for job in jobs:
        cells = "".join(f"<td>{_fmt(v) if (v := headline(job.metrics, m)) is not None else ''}</td>"
                        for m in HEADLINE_METRICS)
        rows.append(f"<tr><td><a href='{base}/jobs/{html.escape(job.job_id)}'>{html.escape(job.job_id)}</a></td>"
                    f"<td>{_fmt(job.action or '')}</td><td class='{job.status}'>{_fmt(job.status or '')}</td>"
                    f"<td>{_fmt(job.updated)}</td>{cells}<td>{_fmt(job.message)}</td></tr>")
    table = (f"<table><tr><th>job (dag / run / task)</th><th>action</th><th>status</th><th>updated</th>{heads}"
             f"<th>last message</th></tr>{''.join(rows)}</table>") if rows else "<p>No jobs yet.</p>"
    return _page("Mask2Former jobs", f"<h1>Mask2Former jobs</h1><p>Results root: <code>{html.escape(str(root))}"
                                     f"</code> ({len(jobs)} jobs)</p>{table}")


def render_job(job: JobSummary, base: str) -> str:
    charts = "".join(svg_chart(name, pts) for name, pts in sorted(series(job.status_lines).items()) if pts)
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in sorted(job.metrics.items()))
    status_rows = "".join(
        f"<tr><td>{_fmt(line.get('date', ''))} {_fmt(line.get('time', ''))}</td>"
        f"<td class='{line.get('status')}'>{_fmt(line.get('status', ''))}</td><td>{_fmt(line.get('message', ''))}</td>"
        f"<td>{_fmt(line.get('epoch', ''))}</td><td>{_fmt(json.dumps(line['kpi']) if line.get('kpi') else '')}</td></tr>"
        for line in job.status_lines)
    images = sorted(p for p in job.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:24]
    gallery = "".join(f"<a href='{base}/files/{html.escape(job.job_id)}/{html.escape(p.relative_to(job.folder).as_posix())}'>"
                      f"<img class='result' src='{base}/files/{html.escape(job.job_id)}/"
                      f"{html.escape(p.relative_to(job.folder).as_posix())}' alt='{html.escape(p.name)}'></a>"
                      for p in images)
    files = "".join(f"<li>{html.escape(p.relative_to(job.folder).as_posix())} ({p.stat().st_size} bytes)</li>"
                    for p in sorted(job.folder.rglob("*")) if p.is_file())
    body = (f"<p><a href='{base}/'>All jobs</a></p><h1>{html.escape(job.job_id)}</h1>"
            f"<p>Action <b>{_fmt(job.action or '?')}</b>, status <b class='{job.status}'>{_fmt(job.status or '?')}</b>"
            f"{', published' if job.finished else ''}. Folder <code>{html.escape(str(job.folder))}</code></p>"
            f"<h2>Metrics</h2>{f'<table>{metric_rows}</table>' if metric_rows else '<p>No metrics.json yet.</p>'}"
            f"<h2>Plots</h2>{charts or '<p>No numeric progress values in status.json yet.</p>'}{gallery}"
            f"<h2>Status</h2><table><tr><th>time</th><th>status</th><th>message</th><th>epoch</th><th>kpi</th></tr>"
            f"{status_rows}</table><h2>Files</h2><ul>{files}</ul>")
    return _page(f"Mask2Former job {job.job_id}", body)


def job_json(job: JobSummary) -> Dict[str, Any]:
    return {"job_id": job.job_id, "action": job.action, "status": job.status, "message": job.message,
            "updated": job.updated, "finished": job.finished, "metrics": job.metrics}
