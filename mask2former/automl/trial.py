"""One AutoML trial: the train CLI as a subprocess, followed through its status.json, pruned on request.

The trial's spec (already sampled and validated) is written to ``spec.yaml`` in the trial folder and
run as ``python -m mask2former train -e spec.yaml --results-dir <trial folder>`` in its own process
group, its output going to ``train.log``. Every validation line of status.json (a RUNNING line with
``kpi.mIoU`` and ``epoch``) is reported to Optuna at step ``epoch``; when the pruner says so the
whole process group is killed, a FAILURE line saying why closes the trial's status.json, and the
trial is told PRUNED. A run that exits non-zero is told FAIL with its last status message. A run
that succeeds is told COMPLETE with the best validation mIoU (``best_model.json``; the checkpoint
downstream actions take by default).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import optuna
import yaml

from mask2former import results
from mask2former.processes import terminate_process_group

from .study import HEARTBEAT_INTERVAL_S, MONITOR_METRIC, retrying

SPEC_FILE = "spec.yaml"
LOG_FILE = "train.log"
STATES = ("COMPLETE", "PRUNED", "FAIL")

Log = Callable[[str], None]


@dataclass
class TrialOutcome:
    """How a trial ended; ``value`` is its best validation mIoU (None unless COMPLETE)."""

    number: int
    state: str
    value: Optional[float]
    results_dir: str
    message: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    history: List[Tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def validation_point(line: Mapping[str, Any], metric: str = MONITOR_METRIC) -> Optional[Tuple[int, float]]:
    """(epoch, metric) of a validation status line, else None."""
    kpi = line.get("kpi") or {}
    value, epoch = kpi.get(metric), line.get("epoch")
    if line.get("status") != "RUNNING" or epoch is None or not isinstance(value, (int, float)) \
            or isinstance(value, bool) or value != value:
        return None
    return int(epoch), float(value)


def train_command(python: str, trial_dir: Path) -> List[str]:
    return [python, "-m", "mask2former", "train", "-e", str(trial_dir / SPEC_FILE), "--results-dir", str(trial_dir)]


def default_env() -> Dict[str, str]:
    """This process's environment with the engine's folder first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def trial_value(trial_dir: Path, history: Sequence[Tuple[int, float]], metric: str = MONITOR_METRIC) -> Optional[float]:
    """The trial's objective: best_model.json's value, else the best reported validation, else metrics.json."""
    best = results.read_best(trial_dir)
    if best and best.get("metric") == metric and isinstance(best.get("value"), (int, float)):
        return float(best["value"])
    if history:
        return max(v for _, v in history)
    value = results.read_metrics(trial_dir).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class TrialRunner:
    """Runs trials one at a time; ``kill()`` (from another thread, e.g. Airflow's on_kill) stops the current one."""

    def __init__(self, *, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 poll_s: float = 1.0, kill_grace_s: float = 10.0, log: Log = print,
                 command: Callable[[str, Path], List[str]] = train_command):
        self.python = python or sys.executable
        self.env = env
        self.poll_s = poll_s
        self.kill_grace_s = kill_grace_s
        self.log = log
        self.command = command
        self._process: Optional[subprocess.Popen] = None
        self._killed = threading.Event()

    @property
    def killed(self) -> bool:
        return self._killed.is_set()

    def kill(self) -> None:
        """Stop the running trial's process group; the trial is then told FAIL ("worker stopped")."""
        self._killed.set()
        self._stop_process()

    def _stop_process(self) -> None:
        if self._process is not None:
            terminate_process_group(self._process, self.kill_grace_s)

    def run(self, study: optuna.Study, trial: optuna.Trial, *, spec_tree: Mapping[str, Any], trial_dir: Path,
            overrides: Mapping[str, Any], heartbeat: Optional[Callable[[], None]] = None) -> TrialOutcome:
        """Train ``spec_tree`` in ``trial_dir``, report each validation, and tell the study how it ended.
        ``heartbeat`` records that the trial is alive (Optuna's heartbeat), every ``HEARTBEAT_INTERVAL_S``."""
        trial_dir = Path(trial_dir)
        trial_dir.mkdir(parents=True, exist_ok=True)
        results.atomic_write_text(trial_dir / SPEC_FILE, yaml.safe_dump(dict(spec_tree), sort_keys=False))
        began = time.monotonic()
        history: List[Tuple[int, float]] = []
        status = trial_dir / results.STATUS_FILE
        offset = status.stat().st_size if status.is_file() else 0  # a retried trial's earlier lines are not its own
        beaten = float("-inf")
        pruned_at: Optional[Tuple[int, float]] = None
        max_epochs = int(spec_tree["train"]["num_epochs"])  # a trial that trained its last epoch is never pruned
        with open(trial_dir / LOG_FILE, "ab") as log_file:
            self._process = subprocess.Popen(self.command(self.python, trial_dir), cwd=trial_dir,
                                             env=self.env or default_env(), stdout=log_file,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            self.log(f"trial {trial.number}: training in {trial_dir} (pid {self._process.pid}, log {LOG_FILE})")
            while True:
                returncode = self._process.poll()
                if heartbeat is not None and time.monotonic() - beaten >= HEARTBEAT_INTERVAL_S:
                    retrying(heartbeat, what=f"record trial {trial.number}'s heartbeat")
                    beaten = time.monotonic()
                lines, offset = results.follow_status(status, offset)
                for line in lines:
                    point = validation_point(line)
                    if point is None or (history and point[0] <= history[-1][0]):
                        continue
                    history.append(point)
                    epoch, value = point
                    retrying(lambda: trial.report(value, step=epoch), what=f"report trial {trial.number}")
                    self.log(f"trial {trial.number}: epoch {epoch} {MONITOR_METRIC} {value:.4f}")
                    if pruned_at is None and returncode is None and epoch < max_epochs and \
                            retrying(trial.should_prune, what=f"ask the pruner about trial {trial.number}"):
                        pruned_at = point
                        self._stop_process()
                if returncode is not None or pruned_at is not None:
                    returncode = self._process.wait()
                    break
                if self._killed.wait(self.poll_s):
                    self._stop_process()
            self._process = None
        seconds = time.monotonic() - began
        outcome = TrialOutcome(number=trial.number, state="FAIL", value=None, results_dir=str(trial_dir),
                               message="", overrides=dict(overrides), history=history, seconds=seconds)
        if pruned_at is not None:
            outcome.state = "PRUNED"
            outcome.message = (f"pruned by AutoML after epoch {pruned_at[0]} ({MONITOR_METRIC} {pruned_at[1]:.4f}); "
                               "training stopped")
            results.StatusWriter(trial_dir).failure(outcome.message)
        elif self.killed:
            outcome.message = "the AutoML worker was stopped; training killed"
            results.StatusWriter(trial_dir).failure(outcome.message)
        elif returncode != 0:
            last = results.read_status(trial_dir)
            why = last[-1].get("message") if last else f"no status line; see {trial_dir / LOG_FILE}"
            outcome.message = f"training failed (exit status {returncode}): {why}"
        else:
            outcome.value = trial_value(trial_dir, history)
            if outcome.value is None:
                outcome.message = (f"training reported no validation {MONITOR_METRIC} (is dataset.val set and "
                                   "train.validation_interval <= the trial's epochs?)")
            else:
                outcome.state = "COMPLETE"
                outcome.message = f"best validation {MONITOR_METRIC} {outcome.value:.4f}"
        tell(study, trial, outcome)
        return outcome


def tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """Record the outcome's attributes on the trial and finish it in the study."""
    for key, value in (("message", outcome.message), ("state", outcome.state), ("seconds", round(outcome.seconds, 2)),
                       ("history", [list(p) for p in outcome.history])):
        retrying(lambda: trial.set_user_attr(key, value), what=f"record {key} of trial {trial.number}")
    state = {"COMPLETE": optuna.trial.TrialState.COMPLETE, "PRUNED": optuna.trial.TrialState.PRUNED,
             "FAIL": optuna.trial.TrialState.FAIL}[outcome.state]
    values = outcome.value if outcome.state == "COMPLETE" else None
    retrying(lambda: study.tell(trial, values, state=state), what=f"finish trial {trial.number}")


__all__ = ["LOG_FILE", "SPEC_FILE", "TrialOutcome", "TrialRunner", "tell", "train_command",
           "trial_value", "validation_point"]
