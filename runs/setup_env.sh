# Sourced by the run scripts: creates .venv on first use and activates it.
#
# Which torch gets installed, and why, is printed:
#   - a GPU that nvidia-smi sees: torch $NANOCHAT_TORCH_VERSION (default 2.11.0, the version runs/gpu_check.sh
#     was run with), CUDA build picked from what the driver supports (cu130, else cu128, else cu126;
#     NANOCHAT_TORCH_CUDA=cu128 etc. forces one), then a check that torch really sees the GPU;
#   - Linux without a GPU: the CPU build from PyTorch's CPU index (the default index's Linux wheel is the
#     CUDA one, gigabytes of NVIDIA libraries), or from the default index if the CPU index is unreachable;
#   - macOS: the default index (CPU + MPS).
# NANOCHAT_TORCH_SPEC (a pip requirement such as "torch==2.9.1") overrides the choice; PYTHON picks the
# interpreter. Without python3-venv (stock Debian/Ubuntu images) the venv is made with uv or virtualenv.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.nanochat-installed"
CPU_TORCH_VERSION=2.13.0
GPU_TORCH_VERSION=${NANOCHAT_TORCH_VERSION:-2.11.0}
TORCH_INDEX=${NANOCHAT_TORCH_INDEX:-https://download.pytorch.org/whl}

# make_venv PYTHON DIR: python -m venv, else uv, else virtualenv, else say in one line what to install.
make_venv() {
    local python=$1 dir=$2
    if "$python" -m venv "$dir" >/dev/null 2>&1; then return 0; fi
    rm -rf "$dir"  # without ensurepip, venv leaves a folder with no pip in it
    if command -v uv >/dev/null 2>&1; then
        echo "[setup] '$python -m venv' is unavailable (no python3-venv package): creating .venv with uv instead"
        uv venv --quiet --seed --python "$python" "$dir" && return 0
    elif "$python" -m virtualenv --version >/dev/null 2>&1 \
            || "$python" -m pip install --quiet --user virtualenv >/dev/null 2>&1; then
        echo "[setup] '$python -m venv' is unavailable (no python3-venv package):" \
            "creating .venv with virtualenv instead"
        "$python" -m virtualenv --quiet "$dir" && return 0
    fi
    rm -rf "$dir"
    echo "[setup] error: cannot create .venv: '$python -m venv' needs the python3-venv package" \
        "(sudo apt-get install -y python3-venv), or install uv or virtualenv" \
        "(python3 -m pip install --user virtualenv)" >&2
    return 1
}

# has_gpu: nvidia-smi exists and lists at least one GPU
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; }

# version_at_least A B: A >= B for dotted versions
version_at_least() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }

# install_torch PYTHON -m pip: chooses the build (see the top of this file), installs it, says which and why
install_torch() {
    local pip=("$@") spec why index=()
    if [ -n "${NANOCHAT_TORCH_SPEC:-}" ]; then
        spec=$NANOCHAT_TORCH_SPEC; why="NANOCHAT_TORCH_SPEC is set"
    elif has_gpu; then
        local driver cuda_max tag=${NANOCHAT_TORCH_CUDA:-}
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
        cuda_max=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n1)
        if [ -z "$tag" ]; then
            if version_at_least "${cuda_max:-0}" 13.0; then tag=cu130
            elif version_at_least "${cuda_max:-0}" 12.8; then tag=cu128
            elif version_at_least "${cuda_max:-0}" 12.6; then tag=cu126
            else
                echo "[setup] error: NVIDIA driver $driver supports CUDA up to ${cuda_max:-?}, older than any" \
                    "build of torch $GPU_TORCH_VERSION (CUDA 12.6 or newer): update the driver, or set" \
                    "NANOCHAT_TORCH_SPEC to an older torch" >&2
                return 1
            fi
        fi
        spec="torch==$GPU_TORCH_VERSION"; index=(--index-url "$TORCH_INDEX/$tag")
        why="NVIDIA GPU found (driver $driver, CUDA up to $cuda_max): the $tag build from $TORCH_INDEX/$tag"
    elif [ "$(uname -s)" = Linux ]; then
        spec="torch==$CPU_TORCH_VERSION"
        if "${pip[0]}" -c "import urllib.request; urllib.request.urlopen('$TORCH_INDEX/cpu', timeout=5)" \
                >/dev/null 2>&1; then
            index=(--index-url "$TORCH_INDEX/cpu"); why="no NVIDIA GPU: the CPU build from $TORCH_INDEX/cpu"
        else
            why="no NVIDIA GPU, and $TORCH_INDEX/cpu is unreachable: the default index"
            why+=" (on Linux that wheel may be the CUDA build)"
        fi
    else
        spec="torch==$CPU_TORCH_VERSION"; why="$(uname -s): the default index's build"
    fi
    echo "[setup] installing $spec: $why"
    "${pip[@]}" install --quiet "$spec" "${index[@]}"
}

# check_torch PYTHON: print the build; when nvidia-smi sees a GPU, torch must see it too
check_torch() {
    local python=$1
    "$python" -c "import torch
print(f'[setup] torch {torch.__version__} (CUDA build: {torch.version.cuda or \"none\"})')"
    if has_gpu && [ -z "${NANOCHAT_TORCH_SPEC:-}" ]; then
        if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
            local driver torch_build
            driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
            torch_build=$("$python" -c "import torch; print(torch.__version__)")
            echo "[setup] error: nvidia-smi sees a GPU (driver $driver) but torch $torch_build cannot use it:" \
                "the wheel needs a newer driver than this one, or it is a CPU build. Remove .venv and set" \
                "NANOCHAT_TORCH_CUDA (cu126, cu128, cu130) or NANOCHAT_TORCH_SPEC to a build this driver" \
                "supports, or update the driver." >&2
            return 1
        fi
    fi
}

if [ "${NANOCHAT_SETUP_FUNCTIONS_ONLY:-0}" = 1 ]; then return 0; fi  # the tests call the functions one by one

if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$STAMP" ]; then
    PYTHON="${PYTHON:-python3}"
    [ -x "$VENV/bin/python" ] || make_venv "$PYTHON" "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        install_torch "$VENV/bin/python" -m pip
    fi
    check_torch "$VENV/bin/python"
    # dev (pytest, selenium) and hf (transformers): the tests of the Hugging Face export need it, in CI too
    echo "[setup] installing nanochat and its dependencies into .venv"
    "$VENV/bin/python" -m pip install --quiet -e "$REPO_ROOT[dev,hf]"
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
