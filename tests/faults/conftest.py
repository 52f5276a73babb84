"""The fault-injection suite: make tests/ and tests/airflow/ importable, give Airflow a private home when this
folder runs alone, and, when ``FAULTS_REPORT`` names a file, write every fault's observed outcome there (one
Markdown row each: fault, how it was injected, what was observed, data lost), as RELIABILITY.md shows."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS, TESTS / "airflow"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="m2f-faults-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from fault_support import OBSERVED  # noqa: E402


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    target = os.environ.get("FAULTS_REPORT")
    if not target or not OBSERVED:
        return
    lines = ["| fault | injected | observed | data lost |", "|---|---|---|---|"]
    lines += [f"| {fault} | {injected} | {observed} | {lost} |".replace("\n", " ") for fault, injected, observed, lost
              in OBSERVED]
    Path(target).write_text("\n".join(lines) + "\n")
