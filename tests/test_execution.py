"""
Sandbox: correct and incorrect programs, then the attacks (infinite loop, memory bomb, fork bomb, writes and
deletes outside its directory, network) each stopped without harm to the caller. Every test runs with the
isolation this machine allows ("namespaces" where unshare works) and with the Python-guard fallback.
"""

import os
import pathlib
import socket
import subprocess
import tempfile
import time

import pytest

from nanochat.execution import execute_code, MAX_PROCESSES


@pytest.fixture(params=[True, False], ids=["isolated", "guards"])
def isolate(request):
    return request.param


def leftover_processes(marker):
    """Processes whose command line mentions marker (the sandbox's directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_correct_and_incorrect_programs(isolate):
    good = execute_code("from typing import List\nimport math\n\ndef f(xs: List[int]):\n    return math.prod(xs)\n\n"
                        "assert f([2, 3]) == 6\nprint('passed')", isolate=isolate)
    assert good.success and good.stdout == "passed\n" and good.error is None, good
    bad = execute_code("def f(xs):\n    return sum(xs)\n\nassert f([2, 3]) == 6, 'wrong product'", isolate=isolate)
    assert not bad.success and bad.error == "AssertionError: wrong product" and not bad.timeout
    # leaving early is not passing, however it is done
    for early_exit in ("import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"):
        assert not execute_code(early_exit, isolate=isolate).success


def test_uses_namespaces_where_the_machine_allows(isolate):
    flags = ["--mount", "--net", "--pid", "--fork"] + ([] if os.geteuid() == 0 else ["--user", "--map-current-user"])
    try:
        allowed = subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0
    except FileNotFoundError:  # no unshare tool: nothing to compare with
        allowed = None
    result = execute_code("print('hi')", isolate=isolate)
    assert result.success
    if not isolate:
        assert result.isolation == "guards"
    elif allowed is not None:
        assert (result.isolation == "namespaces") == allowed, result.isolation


def test_infinite_loop_is_stopped(isolate):
    result = execute_code("import time\nprint('started', flush=True)\nwhile True:\n    pass", timeout=1,
                          isolate=isolate)
    assert result.timeout and not result.success and result.stdout == "started\n"


def test_memory_bomb_is_stopped(isolate):
    result = execute_code("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
                          maximum_memory_bytes=200 * 2**20, isolate=isolate)
    assert result.memory_exceeded and not result.success and not result.timeout
    small = execute_code("x = bytearray(10**7); print(len(x))", maximum_memory_bytes=200 * 2**20, isolate=isolate)
    assert small.success


def test_fork_bomb_is_stopped(isolate):
    # forks children that stay alive; the process limit (or the fork guard) stops it, and nothing survives the run
    program = ("import os, sys, time\nprint(os.getcwd(), flush=True)\nforked = 0\n"
               "for _ in range(1000):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
               "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    forked += 1\n"
               "print(forked, flush=True)\nwhile True:\n    pass")
    result = execute_code(program, timeout=2, isolate=isolate)
    workdir, forked = result.stdout.split()
    assert int(forked) < MAX_PROCESSES and result.timeout and not result.success
    for _ in range(50):  # killed processes leave the process table within moments; wait for that, not on a clock
        if not leftover_processes(workdir):
            break
        time.sleep(0.1)
    assert leftover_processes(workdir) == []


@pytest.fixture
def open_folder():
    """A folder anyone may write to (so file permissions alone would not stop the sandbox's user)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o777)
        yield pathlib.Path(folder)


def test_writes_outside_its_directory_are_stopped(isolate, open_folder):
    target, victim = open_folder / "written.txt", open_folder / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    for program in (f"open({str(target)!r}, 'w').write('x')", f"import os; os.remove({str(victim)!r})",
                    f"import shutil; shutil.rmtree({str(open_folder)!r})",
                    f"import pathlib; pathlib.Path({str(target)!r}).touch()",
                    f"open({str(victim)!r}, 'a').write('changed')"):
        result = execute_code(program, isolate=isolate)
        assert not result.success and ("Read-only file system" in result.error or "not allowed" in result.error), result
    assert not target.exists() and victim.read_text() == "keep me"
    inside = execute_code("import os\nopen('notes.txt', 'w').write('x')\nos.remove('notes.txt')\nprint('ok')",
                          isolate=isolate)
    assert inside.success and inside.stdout == "ok\n"


def test_no_network(isolate):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        result = execute_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                              isolate=isolate)
        assert not result.success
        with pytest.raises(socket.timeout):
            server.accept()  # the sandbox never reached us
