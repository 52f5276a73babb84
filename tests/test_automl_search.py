"""A real search without Airflow: ``python -m mask2former.automl search`` trains the tiny model on the synthetic
set with two worker processes in parallel on one SQLite study, chooses the best trial by mIoU and removes the
other trials' checkpoints; with the policy off the same command trains once."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automl_support import FIXED_SIZES, SMALL_RANGES, make_data, tiny_spec, write_yaml
from mask2former import results

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("automl-search")
    roots = make_data(folder / "data", images=6, val_images=4)
    return write_yaml(folder / "spec.yaml", tiny_spec(roots))


def automl_cli(*words: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # two trials share the two cores
    return subprocess.run([sys.executable, "-m", "mask2former.automl", *words], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def started_and_finished(folder: Path):
    lines = results.read_status(folder)
    stamp = lambda line: dt.datetime.fromisoformat(f"{line['date']}T{line['time']}")  # noqa: E731
    return stamp(lines[0]), stamp(lines[-1])


def test_two_parallel_workers_search_and_the_best_trial_is_kept(spec_file, tmp_path):
    search = tmp_path / "search"
    ranges = [f"--range={key}={json.dumps(value)}" for key, value in SMALL_RANGES.items()]
    removed = [f"--remove={key}" for key in FIXED_SIZES]
    done = automl_cli("search", "-e", str(spec_file), "--results-dir", str(search), "--algorithm", "random",
                      "--max-recommendations", "2", "--max-epochs", "1", "--workers", "2", "--seed", "5",
                      "--cleanup-non-best", *ranges, *removed)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = json.loads((search / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], rows
    assert sorted(r["slot"] for r in rows) == [0, 1]
    (a_start, a_end), (b_start, b_end) = (started_and_finished(Path(r["results_dir"])) for r in rows)
    assert a_start <= b_end and b_start <= a_end  # the two trainings overlapped in time

    best = max(rows, key=lambda r: r["value"])
    other = min(rows, key=lambda r: r["value"])
    recorded = json.loads((search / "best_trial.json").read_text())
    assert recorded["number"] == best["number"] and recorded["value"] == pytest.approx(best["value"])
    assert f"best trial {best['number']}" in done.stdout
    best_dir = Path(best["results_dir"])
    assert best["value"] == pytest.approx(results.read_best(best_dir)["value"])  # the trial's best epoch mIoU
    assert results.resolve_parent_model(best_dir).is_file()
    assert list(best_dir.glob("*.pth")) and not list(Path(other["results_dir"]).glob("*.pth"))
    for row in rows:  # the sampled spec was what the trial trained with
        spec = yaml.safe_load((Path(row["results_dir"]) / "spec.yaml").read_text())
        assert spec["model"]["mask_former"]["hidden_dim"] == row["param.model.mask_former.hidden_dim"]
        assert spec["train"]["optim"]["lr"] == pytest.approx(row["param.train.optim.lr"])
        assert spec["train"]["num_epochs"] == 1
    metrics = results.read_metrics(search)
    assert metrics["mIoU"] == pytest.approx(best["value"]) and metrics["complete"] == 2
    assert metrics["removed_checkpoints"] >= 1
    assert results.read_status(search)[-1]["status"] == "SUCCESS"
    assert (search / "trials.csv").read_text().splitlines()[0].startswith("number,state,value,best_so_far")
    assert (search / "metric_per_trial.png").read_bytes()[:4] == b"\x89PNG"


def test_policy_off_trains_once_without_a_search(spec_file, tmp_path):
    folder = tmp_path / "direct"
    done = automl_cli("search", "-e", str(spec_file), "--results-dir", str(folder), "--policy", "off")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AutoML is off (this run's override): training directly." in done.stderr
    assert results.read_status(folder)[-1]["status"] == "SUCCESS"
    assert (folder / results.LATEST_CHECKPOINT).is_file()
    assert not (folder / "automl_plan.json").exists() and not (folder / "trials").exists()


def test_an_invalid_request_is_refused_before_any_trial(spec_file, tmp_path):
    folder = tmp_path / "refused"
    done = automl_cli("search", "-e", str(spec_file), "--results-dir", str(folder), "--add", "train.num_epochs")
    assert done.returncode == 2
    assert "train.num_epochs" in done.stderr and "AutoML never varies it" in done.stderr
    assert not (folder / "trials").exists()
