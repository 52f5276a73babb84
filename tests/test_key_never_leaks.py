"""The encryption key never shows in what an engine run prints or logs, in its results folder (status.json,
experiment.yaml, every other file), in the temporary folder, or in the command line of the engine or of any
process it starts (the DDP worker ranks), read from /proc/<pid>/cmdline while the run goes on.

Real command lines: ``python -m mask2former train`` with two CPU ranks (gloo), the key in
MASK2FORMER_ENCRYPTION_KEY as the operators pass it; ``python -m mask2former export`` with the key in the
user's spec file; an export refused for a wrong key. The scan helpers live in tests/secret_scan.py.

Under Airflow: tests/airflow/test_airflow_encryption.py (a DAG run with ``dag.test``: its XCom and log) and
tests/faults/test_faults_scheduler.py (a real scheduler, triggerer and LocalExecutor: every task log file, every
Airflow process's output, every XCom, every results file and every process's command line on the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mask2former import crypto, results
from secret_scan import CommandLineWatcher, file_leaks, leaks
from train_support import REPO, make_data, tiny_spec, write_spec

KEY = "leak-Test/9xQ!amber-falcon-27"
WRONG_KEY = "wrong-Key/7zR!cedar-osprey-41"

pytestmark = pytest.mark.slow


def run_engine(args, *, tmp: Path, key_env=None, timeout=900) -> SimpleNamespace:
    """The engine's CLI in a subprocess, its process tree's command lines watched until it exits."""
    env = {k: v for k, v in os.environ.items() if k != crypto.KEY_ENV}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp))
    if key_env is not None:
        env[crypto.KEY_ENV] = key_env
    process = subprocess.Popen([sys.executable, "-m", "mask2former", *args], cwd=str(REPO), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = CommandLineWatcher(process.pid).start()
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        watcher.stop()
    return SimpleNamespace(code=process.returncode, output=out + err, watcher=watcher)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    roots = make_data(root / "data", images=4, val_images=2, size=64)
    tmp = root / "tmp"
    tmp.mkdir()
    train_spec = write_spec(root / "train.yaml", tiny_spec(roots, batch_size=1))
    train = run_engine(["train", "-e", str(train_spec), "--results-dir", str(root / "train"), "train.num_gpus=2",
                        "train.gpu_ids=[0,1]"], tmp=tmp, key_env=KEY)
    export_spec = write_spec(root / "export.yaml", {"model": tiny_spec(roots)["model"], "encryption_key": KEY,
                                                    "export": {"input_height": 64, "input_width": 64}})
    export = run_engine(["export", "-e", str(export_spec), "--results-dir", str(root / "export"),
                         f"export.checkpoint={root / 'train'}"], tmp=tmp)
    refused = run_engine(["export", "--results-dir", str(root / "refused"),
                          f"export.checkpoint={root / 'train'}"], tmp=tmp, key_env=WRONG_KEY)
    return SimpleNamespace(root=root, tmp=tmp, train=train, export=export, refused=refused)


def test_the_runs_did_what_the_scan_relies_on(runs):
    assert runs.train.code == 0, runs.train.output[-3000:]
    assert runs.export.code == 0, runs.export.output[-3000:]
    assert runs.refused.code == 1 and "The encryption key is wrong for" in runs.refused.output
    assert crypto.is_encrypted(runs.root / "train" / results.LATEST_CHECKPOINT)
    assert crypto.is_encrypted(runs.root / "export" / "model.onnx")
    # the watcher saw the engine and its second DDP rank, so their command lines were scanned
    assert runs.train.watcher.matching("-m mask2former train")
    assert runs.train.watcher.matching("mask2former.training.worker"), runs.train.watcher.lines()
    assert runs.export.watcher.matching("-m mask2former export")


def test_no_command_line_shows_the_key(runs):
    for run in (runs.train, runs.export, runs.refused):
        assert not leaks(run.watcher.text(), KEY, WRONG_KEY), run.watcher.lines()


def test_nothing_printed_or_logged_shows_the_key(runs):
    for run in (runs.train, runs.export, runs.refused):
        assert run.output and not leaks(run.output, KEY, WRONG_KEY)


def test_no_file_of_any_results_folder_or_the_temporary_folder_shows_the_key(runs):
    for name in ("train", "export", "refused"):
        folder = runs.root / name
        assert (folder / "status.json").is_file() and (folder / "experiment.yaml").is_file()
        assert "encryption_key" not in yaml.safe_load((folder / "experiment.yaml").read_text())
        assert file_leaks(folder, KEY, WRONG_KEY) == {}, name
    assert file_leaks(runs.tmp, KEY, WRONG_KEY) == {}  # the ranks' private spec file is gone
