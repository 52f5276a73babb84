#!/usr/bin/env bash
# The README's test command: set up .venv, check generated files and the layer contracts (pyproject.toml's
# [tool.importlinter]), run the whole test suite (the slow end-to-end tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh dev
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -m mask2former schemas --check
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1200 "$@"
