#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) from requirements*.txt.
# Idempotent: re-installs only when a requirements file changed since the last successful install.
# Usage: scripts/setup_venv.sh [runtime|dev]   (dev adds requirements-dev.txt; default dev)
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-dev}"
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
reqs=(requirements.txt)
[ "$kind" = "dev" ] && reqs+=(requirements-dev.txt)
stamp="$venv/.requirements-$kind.sha256"
want="$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "Setting up $venv ($kind requirements) ..." >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and alone: the pinned release resolves to the local CPU build where one is on disk.
"$venv/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)"
args=()
for r in "${reqs[@]}"; do args+=(-r "$r"); done
"$venv/bin/python" -m pip install -q "${args[@]}"
echo "$want" > "$stamp"
