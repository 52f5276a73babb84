#!/usr/bin/env bash
# The README's test command: set up .venv, check generated files and the layer contracts (pyproject.toml's
# [tool.importlinter]), run the whole test suite (the slow end-to-end tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh dev
# The browser journey test drives Debian's chromium headless (Playwright); install it when absent and possible.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; } \
            || echo "chromium could not be installed: the browser test will be skipped" >&2
    else
        echo "chromium is not installed (apt-get install chromium as root): the browser test will be skipped" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -m mask2former schemas --check
.venv/bin/lint-imports --no-cache
# test files run in parallel worker processes (PYTEST_WORKERS, default 3): most of the suite waits on Airflow
# schedulers and job processes rather than computing; a file stays in one worker (module-scoped Airflow stacks).
# The 15 slowest tests are listed at the end, to see where the suite's time goes.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=1200 -n "${PYTEST_WORKERS:-3}" --dist loadfile \
    --durations=15 "$@"
