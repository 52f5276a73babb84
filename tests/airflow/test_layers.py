"""The layer contracts of pyproject.toml ([tool.importlinter], run by scripts/test.sh) hold on this tree, and
each one fails when a violation is planted in a copy of it: the engine importing Airflow, a bottom layer of the
engine importing a top one, the Airflow side importing torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"

PLANTED = {
    "mask2former/results.py": ("import airflow.sdk  # planted", "The engine runs without Airflow"),
    "mask2former/errors.py": ("from . import cli  # planted", "The engine's layers import only downward"),
    "operators/hooks/storage.py": ("import torch  # planted", "The Airflow side imports the engine's light modules"),
}


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_contracts_hold():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("path", sorted(PLANTED))
def test_a_planted_violation_breaks_its_contract(tmp_path, path):
    for part in ("mask2former", "operators"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    line, contract = PLANTED[path]
    planted = tmp_path / path
    planted.write_text(planted.read_text().replace("from __future__ import annotations",
                                                   f"from __future__ import annotations\n{line}", 1)
                       if "from __future__" in planted.read_text() else f"{line}\n{planted.read_text()}")
    done = lint(tmp_path)
    assert done.returncode != 0
    listing = " ".join(done.stdout.split())
    verdicts = {name: re.search(re.escape(name) + r".*?\b(KEPT|BROKEN)\b", listing).group(1)
                for _, name in PLANTED.values()}
    assert verdicts == {name: "BROKEN" if name == contract else "KEPT" for _, name in PLANTED.values()}, listing
