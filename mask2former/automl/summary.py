"""The search's report: a trials table (CSV and JSON) and a metric-per-trial plot (PNG).

One row per trial: number, state (COMPLETE | PRUNED | FAIL), value (best validation mIoU of a
complete trial), best_so_far, last reported epoch and metric, seconds, worker slot, results folder,
message, then one column per searched key (``param.<dotted key>``) with the spec value the trial
used. The plot shows every trial's value (pruned trials at their last reported metric, failed ones
on the axis) and the best-so-far line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mask2former import results

TRIALS_CSV = "trials.csv"
TRIALS_JSON = "trials.json"
PLOT_FILE = "metric_per_trial.png"
_FIXED_COLUMNS = ("number", "state", "value", "best_so_far", "last_epoch", "last_metric", "seconds", "slot",
                  "results_dir", "message")


def _state_name(trial: Any) -> str:
    name = trial.state.name
    return "FAIL" if name in ("RUNNING", "WAITING") else name


def trial_rows(trials: Sequence[Any]) -> List[Dict[str, Any]]:
    """Rows of the trials table from Optuna FrozenTrials, by trial number."""
    rows = []
    best: Optional[float] = None
    for trial in sorted(trials, key=lambda t: t.number):
        attrs = trial.user_attrs
        state = _state_name(trial)
        value = float(trial.value) if state == "COMPLETE" and trial.value is not None else None
        if value is not None:
            best = value if best is None else max(best, value)
        history = attrs.get("history") or [[step, v] for step, v in sorted(trial.intermediate_values.items())]
        row = {
            "number": trial.number,
            "state": state,
            "value": value,
            "best_so_far": best,
            "last_epoch": history[-1][0] if history else None,
            "last_metric": history[-1][1] if history else None,
            "seconds": attrs.get("seconds"),
            "slot": attrs.get("slot"),
            "results_dir": attrs.get("results_dir"),
            "message": attrs.get("message", ""),
        }
        for key, param in sorted((attrs.get("overrides") or {}).items()):
            row[f"param.{key}"] = param
        rows.append(row)
    return rows


def best_trial_record(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The COMPLETE row with the highest value (the lowest number on a tie), or None."""
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if not complete:
        return None
    best = max(complete, key=lambda r: (r["value"], -r["number"]))
    return {"number": best["number"], "value": best["value"], "results_dir": best["results_dir"],
            "parameters": {k[len("param."):]: v for k, v in best.items() if k.startswith("param.")}}


def rows_to_csv(rows: Sequence[Dict[str, Any]]) -> str:
    columns = list(_FIXED_COLUMNS) + sorted({k for r in rows for k in r if k not in _FIXED_COLUMNS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def plot_metric_per_trial(rows: Sequence[Dict[str, Any]], path: Path, *, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    styles = {"COMPLETE": ("o", "tab:blue", "complete"), "PRUNED": ("x", "tab:orange", "pruned (last report)"),
              "FAIL": ("v", "tab:red", "failed")}
    for state, (marker, color, label) in styles.items():
        picked = [r for r in rows if r["state"] == state]
        if not picked:
            continue
        ys = [(r["value"] if state == "COMPLETE" else (r["last_metric"] if state == "PRUNED" else None))
              for r in picked]
        ys = [0.0 if y is None else y for y in ys]
        ax.scatter([r["number"] for r in picked], ys, marker=marker, color=color, label=label, zorder=3)
    steps = [(r["number"], r["best_so_far"]) for r in rows if r["best_so_far"] is not None]
    if steps:
        ax.step([s[0] for s in steps], [s[1] for s in steps], where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"AutoML: {metric} per trial")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_summary(rows: Sequence[Dict[str, Any]], folder: Path, *, metric: str) -> Dict[str, Path]:
    """trials.csv, trials.json and metric_per_trial.png in ``folder``; returns their paths."""
    folder = Path(folder)
    files = {"trials_csv": folder / TRIALS_CSV, "trials_json": folder / TRIALS_JSON, "plot": folder / PLOT_FILE}
    results.atomic_write_text(files["trials_csv"], rows_to_csv(rows))
    results.atomic_write_text(files["trials_json"], json.dumps(list(rows), indent=2, default=str) + "\n")
    plot_metric_per_trial(rows, files["plot"], metric=metric)
    return files


__all__ = ["PLOT_FILE", "TRIALS_CSV", "TRIALS_JSON", "best_trial_record", "plot_metric_per_trial", "rows_to_csv",
           "trial_rows", "write_summary"]
