#!/usr/bin/env bash
# Main job: run the mask2former_pipeline DAG end to end on this machine (embedded default deployment:
# SQLite metadata, LocalExecutor, ./airflow_home, results under ./demo/results), in a few minutes.
#
#   bash scripts/run_demo.sh [--epochs N] [--images N] [--size PX] [--fresh]
#
# Sets up ./.venv from requirements.txt first when it is missing or stale (scripts/setup_venv.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"

VENV="$VENV" "$REPO/scripts/setup_venv.sh" runtime

# The venv's bin first: Airflow starts helper processes by the name `airflow`.
export PATH="$VENV/bin:$PATH"
cd "$REPO"
exec "$VENV/bin/python" "$REPO/scripts/run_demo.py" "$@"
