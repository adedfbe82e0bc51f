#!/usr/bin/env bash
# Bootstraps .venv (first run only) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$REPO_ROOT"
python -m pytest -q "$@"
