"""
runs/setup_env.sh's decisions, with stand-ins for python3 -m venv, uv, nvidia-smi and pip on PATH
(no network, nothing installed): the venv fallbacks, which torch build is chosen and why, and the
check that torch sees the GPU that nvidia-smi sees.
"""

import os
import stat
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tool(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def run_setup_function(tmp_path, call, env=None):
    """Source setup_env.sh for its functions only, then run `call` with tmp_path/bin first on PATH."""
    script = f'NANOCHAT_SETUP_FUNCTIONS_ONLY=1 source "{REPO_ROOT}/runs/setup_env.sh"; {call}'
    full_env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", **(env or {}))
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full_env, timeout=60)


def fake_python_without_venv(tmp_path):
    """
    A python3 like a stock Debian image's: no ensurepip (venv fails, leaving a folder), no virtualenv,
    pip offline.
    """
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    write_tool(folder, "python3", f"""
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; echo "ensurepip is not available" >&2; exit 1; fi
if [ "$1 $2" = "-m virtualenv" ] || [ "$1 $2" = "-m pip" ]; then echo "No module named $2" >&2; exit 1; fi
exec {sys.executable} "$@"
""")
    return folder


def test_without_python3_venv_uv_makes_the_venv(tmp_path):
    folder = fake_python_without_venv(tmp_path)
    write_tool(folder, "uv", f'echo "$@" > "{tmp_path}/uv_args"; mkdir -p "${{@: -1}}/bin"')
    result = run_setup_function(tmp_path, f'make_venv python3 "{tmp_path}/venv"')
    assert result.returncode == 0, result.stderr
    assert "creating .venv with uv instead" in result.stdout
    assert (tmp_path / "uv_args").read_text().split() == ["venv", "--quiet", "--seed", "--python", "python3",
                                                          f"{tmp_path}/venv"]


def test_without_any_way_to_make_a_venv_one_line_says_what_to_install(tmp_path):
    fake_python_without_venv(tmp_path)
    result = run_setup_function(tmp_path, f'make_venv python3 "{tmp_path}/venv"')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install -y python3-venv" in lines[0] and "virtualenv" in lines[0]
    assert not (tmp_path / "venv").exists()  # the half-made folder is gone, so the next run starts clean


def fake_gpu(tmp_path, driver, cuda):
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    write_tool(folder, "nvidia-smi", f"""
case "$*" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";;
  *query-gpu=driver_version*) echo "{driver}";;
  *) echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda} |";;
esac""")


def test_gpu_gets_the_pinned_torch_with_the_cuda_build_its_driver_supports(tmp_path):
    fake_gpu(tmp_path, "570.86.15", "12.8")
    result = run_setup_function(tmp_path, "install_torch echo pip")
    assert result.returncode == 0, result.stderr
    assert "driver 570.86.15, CUDA up to 12.8" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == \
        "pip install --quiet torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
    result = run_setup_function(tmp_path, "install_torch echo pip",
                                env={"NANOCHAT_TORCH_CUDA": "cu126", "NANOCHAT_TORCH_VERSION": "2.10.0"})
    assert result.stdout.strip().splitlines()[-1] == \
        "pip install --quiet torch==2.10.0 --index-url https://download.pytorch.org/whl/cu126"


def test_a_driver_too_old_for_any_build_is_named(tmp_path):
    fake_gpu(tmp_path, "525.60.13", "12.0")
    result = run_setup_function(tmp_path, "install_torch echo pip")
    assert result.returncode == 1
    assert "driver 525.60.13 supports CUDA up to 12.0" in result.stderr and "update the driver" in result.stderr


def test_cpu_linux_uses_the_cpu_index_when_reachable_else_the_default(tmp_path, file_server):
    (tmp_path / "served" / "cpu").write_text("<html>torch</html>")  # the index page the probe asks for
    (tmp_path / "bin").mkdir()
    call = f"install_torch {sys.executable} -c 'import sys; print(\"pip\", *sys.argv[1:])'"
    result = run_setup_function(tmp_path, call, env={"NANOCHAT_TORCH_INDEX": file_server.url})
    assert result.returncode == 0, result.stderr
    assert f"the CPU build from {file_server.url}/cpu" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == \
        f"pip install --quiet torch==2.13.0 --index-url {file_server.url}/cpu"
    result = run_setup_function(tmp_path, call, env={"NANOCHAT_TORCH_INDEX": "http://127.0.0.1:9"})
    assert "is unreachable: the default index" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "pip install --quiet torch==2.13.0"


def test_torch_that_cannot_see_the_gpu_is_an_error_naming_driver_and_wheel(tmp_path):
    fake_gpu(tmp_path, "535.104.05", "12.2")
    result = run_setup_function(tmp_path, f"check_torch {sys.executable}")  # this machine's torch: CPU-only
    assert result.returncode == 1
    assert "driver 535.104.05" in result.stderr and "torch 2." in result.stderr
    assert "NANOCHAT_TORCH_CUDA" in result.stderr
