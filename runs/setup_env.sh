# Sourced by the run scripts: creates .venv on first use and activates it.
# CPU-only machines get the CPU build of torch; machines with an NVIDIA GPU get the default CUDA build.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.nanochat-installed"
if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$STAMP" ]; then
    PYTHON="${PYTHON:-python3}"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            echo "[setup] NVIDIA GPU found: installing the default (CUDA) build of torch"
            "$VENV/bin/python" -m pip install --quiet "${NANOCHAT_TORCH_SPEC:-torch>=2.8.0}"
        else
            echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
            "$VENV/bin/python" -m pip install --quiet "${NANOCHAT_TORCH_SPEC:-torch==2.13.0}"
        fi
    fi
    echo "[setup] installing nanochat and its dependencies into .venv"
    "$VENV/bin/python" -m pip install --quiet -e "$REPO_ROOT[dev]"
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
