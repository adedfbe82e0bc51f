"""
The sandbox against every probe of issue 26 and the earlier ones, in both modes: "namespaces" (where this machine
allows them) and "fallback" (forced with namespaces=False; as root it runs with a Python that other users can read,
since the fallback refuses others). Each probe asserts that the harm did not happen (no file written, no process
left, nothing read), not only that the program failed, and each has a control showing the probe would work outside
the sandbox or that honest programs still pass.
"""

import ast
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import namedtuple

import pytest

from nanochat import sandbox
from nanochat.execution import SandboxUnavailable, execute_code
from nanochat.sandbox_runner import MAX_DISK_BYTES, MAX_FILES, MAX_PROCESSES, literal

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def fallback_python():
    """An interpreter the fallback accepts: as root, one whose standard library the sandbox's uid can read."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]):
        if python and os.path.exists(python):
            try:
                if execute_code("pass", namespaces=False, python=python).success:
                    return python
            except SandboxUnavailable:
                pass
    pytest.skip("no Python here that the fallback accepts (as root: none that other users can read)")


class Sandbox:
    def __init__(self, name, **options):
        self.name, self.options = name, options

    def run(self, code, **kwargs):
        result = execute_code(code, **self.options, **kwargs)
        assert result.isolation == self.name, result
        return result


@pytest.fixture(params=["namespaces", "fallback"])
def box(request):
    if request.param == "fallback":
        return Sandbox("fallback", namespaces=False, python=request.getfixturevalue("fallback_python"))
    if execute_code("pass").isolation != "namespaces":
        pytest.skip("this machine does not allow namespaces")
    return Sandbox("namespaces")


def marker():
    """A unique number, used as `sleep`'s argument to find a process in the host's process table."""
    return f"{1000 + uuid.uuid4().int % 10**9 / 10**6:.6f}"


def processes_with(mark):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


class Watcher(threading.Thread):
    """Notes whether a process with mark ever shows up in the host's process table while the sandbox runs."""

    def __init__(self, mark):
        super().__init__(daemon=True)
        self.mark, self.seen, self.done = mark, False, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen |= bool(processes_with(self.mark))
            time.sleep(0.02)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.done.set()
        self.join()


# ---------------------------------------------------------------------------------------------------------------
# Programs and verdicts

def test_correct_and_incorrect_programs(box):
    good = box.run("from typing import List\nimport math\n\ndef f(xs: List[int]):\n    return math.prod(xs)\n\n"
                   "assert f([2, 3]) == 6\nprint('passed')")
    assert good.success and good.stdout == "passed\n" and good.error is None, good
    bad = box.run("def f(xs):\n    return sum(xs)\n\nassert f([2, 3]) == 6, 'wrong product'")
    assert not bad.success and bad.error == "AssertionError: wrong product" and not bad.timeout
    # leaving early is not getting to the end, however it is done
    for early_exit in ("import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"):
        assert not box.run(early_exit).success


ADD_TEST = ("def check(candidate):\n    # TEST_SECRET_4711\n"
            "    for a, b in [(2, 3), (10, -4), (7, 7)]:\n        assert candidate(a, b) == a + b, f'{a} + {b}'\n")
WRONG_ADD = "def add(a, b):\n    return a - b\n"


def test_verdict_of_a_test(box):
    check = dict(test=ADD_TEST, entry_point="add")
    passed = box.run("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", **check)
    assert passed.success and passed.error is None and passed.stdout.count("adding") == 3, passed
    failed = box.run(WRONG_ADD, **check)
    assert not failed.success and failed.error == "AssertionError: 2 + 3", failed
    raising = box.run("def add(a, b):\n    raise ValueError('no adding today')\n", **check)
    assert not raising.success and raising.error == "ValueError: no adding today"
    with pytest.raises(ValueError, match="needs entry_point="):
        box.run(WRONG_ADD, test=ADD_TEST)
    missing = box.run("def plus(a, b):\n    return a + b\n", **check)
    assert not missing.success and "defines no function add" in missing.error
    broken = box.run("def add(a, b):\n    return a + b\n\nraise RuntimeError('at import')\n", **check)
    assert not broken.success and broken.error == "RuntimeError: at import"
    looping = box.run("def add(a, b):\n    while True:\n        pass\n", timeout=1, **check)
    assert not looping.success and looping.timeout
    # values of every plain kind cross as they are (tuple stays tuple, None stays None, ...)
    kinds = box.run("def f(x):\n    return x\n", entry_point="f", test=(
        "def check(candidate):\n    for v in [None, True, 3, -0.5, float('inf'), 2 + 1j, 'a\\nb', b'\\x00', (1,), [()],"
        " {1: {'a'}}, set()]:\n        assert candidate(v) == v and type(candidate(v)) is type(v), v\n"))
    assert kinds.success, kinds
    # a test may expect an exception of the program's function
    expects = box.run("def root(x):\n    if x < 0:\n        raise ValueError(x)\n    return x ** 0.5\n", entry_point="root",
                      test="def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n"
                           "        return\n    assert False, 'no ValueError'\n")
    assert expects.success, expects


def test_test_setup_is_trusted_and_tests_may_call_the_function_by_name(box):
    # HumanEval/32: the test calls the prompt's poly(); HumanEval/33: it calls sort_third() by name
    setup = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\ndef find_zero(xs):\n    '''doc'''\n"
    test = ("def check(candidate):\n    for xs in ([-2, 1], [-6, 11, -6, 1]):\n"
            "        assert abs(poly(xs, candidate(xs))) < 1e-6\n    assert abs(poly([-3, 1], find_zero([-3, 1]))) < 1e-6\n")
    honest = setup + ("def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    for _ in range(200):\n"
                      "        mid = (lo + hi) / 2\n        if (poly(xs, lo) < 0) == (poly(xs, mid) < 0):\n"
                      "            lo = mid\n        else:\n            hi = mid\n    return lo\n")
    assert box.run(honest, test=test, test_setup=setup, entry_point="find_zero").success
    # redefining the prompt's helper changes nothing in the test's poly
    cheat = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 12345.0\n"
    result = box.run(cheat, test=test, test_setup=setup, entry_point="find_zero")
    assert not result.success and result.error == "AssertionError"


FORGERIES = {
    "os._exit(0)": WRONG_ADD + "import os\nos._exit(0)\n",
    "sys.exit(0)": WRONG_ADD + "import sys\nsys.exit(0)\n",
    "success marker on stdout": WRONG_ADD + "print('passed')\nprint('True')\nprint('ok')\n",
    # the pipes are in reach: say "done" and pre-answer calls on every file descriptor, then leave
    "fake messages on every fd": WRONG_ADD + "import os\nfor fd in range(3, 256):\n    try:\n"
                                 "        os.write(fd, b\"('done',)\\n\" + b\"('return', 5)\\n\" * 5)\n"
                                 "    except OSError:\n        pass\nos._exit(0)\n",
    # the harness' objects from its frames: write on whatever can be written, then leave
    "harness frames": WRONG_ADD + "import os, sys\nframe = sys._getframe()\nwhile frame:\n"
                      "    for value in list(frame.f_locals.values()):\n"
                      "        if hasattr(value, 'write') and hasattr(value, 'flush') and value not in (sys.stdout, sys.stderr):\n"
                      "            try:\n                value.write(b\"('done',)\\n\"); value.flush()\n"
                      "            except Exception:\n                pass\n    frame = frame.f_back\nos._exit(0)\n",
    "always-equal result": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                           "    def __ne__(self, other):\n        return False\n\n"
                           "def add(a, b):\n    return Anything()\n",
    "patched assert and hooks": "import builtins, sys\nbuiltins.AssertionError = type('Harmless', (Exception,), {})\n"
                                "sys.excepthook = lambda *args: None\nbuiltins.print = lambda *args, **kw: None\n"
                                + WRONG_ADD,
    "trace function skipping the asserts": "import sys, threading\n"
                                           "def skip(frame, event, arg):\n"
                                           "    if frame.f_code.co_name == 'check' and event == 'line':\n"
                                           "        frame.f_lineno = frame.f_code.co_firstlineno + 4\n"
                                           "    return skip\nsys.settrace(skip)\nthreading.settrace(skip)\n" + WRONG_ADD,
    "kill the runner": WRONG_ADD + "import os, signal\nfor pid in (os.getppid(), -1):\n    try:\n"
                       "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nos._exit(0)\n",
}


@pytest.mark.parametrize("attack", FORGERIES)
def test_verdict_cannot_be_forged(box, attack):
    result = box.run(FORGERIES[attack], test=ADD_TEST, entry_point="add")
    assert not result.success, result
    assert "runner failed" not in (result.error or ""), result  # the runner lived to judge
    honest = box.run(FORGERIES[attack].replace("return a - b", "return a + b"), test=ADD_TEST, entry_point="add")
    assert honest.success == (attack in ("success marker on stdout", "patched assert and hooks",
                                         "trace function skipping the asserts")), honest


def test_the_test_is_never_in_the_programs_reach(box):
    # the program looks for the test's text in its own objects, its parent's command line and stdin
    program = WRONG_ADD + (
        "import gc, os, sys\nneedle, body = 'TEST_' + 'SECRET_' + '4711', 'assert ' + 'candidate'\nfound = []\n"
        "for obj in gc.get_objects():\n"
        "    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []\n"
        "    found += [v for v in values if isinstance(v, (str, bytes)) and needle in str(v) and body in str(v)]\n"
        "for path in (f'/proc/{os.getppid()}/cmdline', f'/proc/{os.getppid()}/environ', '/dev/stdin'):\n"
        "    try:\n        found += [path] if body in open(path, errors='replace').read() else []\n"
        "    except OSError:\n        pass\n"
        "print('found' if found else 'not found', flush=True)\n")
    result = box.run(program, test=ADD_TEST, entry_point="add")
    assert result.stdout == "not found\n" and not result.success, result


def test_literal_round_trips_plain_data_and_refuses_the_rest():
    Point = namedtuple("Point", "x y")
    for value in [None, True, False, 0, -7, 10**40, 0.1, -0.0, math.inf, -math.inf, 1 - 2j, "", "it's\n\"ok\"\x00",
                  b"\xff", (), (1,), [1, [2, (3,)]], {1, 2}, set(), frozenset({3}), {"a": [1], (1, 2): None}]:
        back = ast.literal_eval(literal(value))
        assert back == value and type(back) is (set if type(value) is frozenset else type(value)), value
    assert ast.literal_eval(literal(Point(1, 2))) == (1, 2) and ast.literal_eval(literal(True)) is True

    class Anything:
        def __eq__(self, other):
            return True
    for bad in (Anything(), math.nan, [1, Anything()], {1: Anything()}, print, iter([1])):
        with pytest.raises(TypeError):
            literal(bad)


# ---------------------------------------------------------------------------------------------------------------
# Resources and processes

def test_infinite_loop_is_stopped(box):
    result = box.run("print('started', flush=True)\nwhile True:\n    pass", timeout=1)
    assert result.timeout and not result.success and result.stdout == "started\n"


def test_memory_bomb_is_stopped(box):
    result = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", maximum_memory_bytes=200 * 2**20)
    assert result.memory_exceeded and not result.success and not result.timeout
    small = box.run("x = bytearray(10**7); print(len(x))", maximum_memory_bytes=200 * 2**20)
    assert small.success


def test_fork_bomb_is_stopped_and_nothing_survives(box):
    mark = marker()
    program = ("import os\nforked = 0\nfor _ in range(1000):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\n    forked += 1\n"
               "print(forked, flush=True)\nwhile True:\n    pass")
    with Watcher(mark) as watcher:
        result = box.run(program, timeout=2)
    assert 0 < int(result.stdout) < MAX_PROCESSES and result.timeout  # the program itself is one of them
    assert watcher.seen and processes_with(mark) == []  # they ran, and were gone when execute_code returned


def test_double_forked_daemon_is_killed(box):
    mark = marker()
    program = ("import os\nready_r, ready_w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n"
               "    if os.fork() == 0:\n        os.write(ready_w, b'x')\n"
               f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\n    os._exit(0)\n"
               "os.read(ready_r, 1)\nprint('daemon started', flush=True)\n")
    with Watcher(mark) as watcher:
        result = box.run(program + "import time\ntime.sleep(0.3)\n")
    assert result.success and result.stdout == "daemon started\n", result
    assert watcher.seen and processes_with(mark) == []


def test_signals_reach_no_other_process(box):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        result = box.run("import os, signal\nfor pid in (-1, os.getppid(), %d):\n    try:\n"
                         "        os.kill(pid, signal.SIGKILL)\n        print('sent', flush=True)\n"
                         "    except OSError as e:\n        print(e.strerror, flush=True)\n" % bystander.pid)
        assert result.success and bystander.poll() is None, result
        assert result.stdout.count("sent") <= 1  # kill(getppid()) is kill(0) in a PID namespace: its own group
    finally:
        bystander.kill()
        bystander.wait()


def test_privileges_are_dropped(box):
    result = box.run(
        "import ctypes, os\nclass Header(ctypes.Structure):\n"
        "    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]\n"
        "caps = (ctypes.c_uint32 * 6)()\nctypes.CDLL(None).capget(ctypes.byref(Header(0x20080522, 0)), caps)\n"
        "print(os.getuid(), os.geteuid(), os.getgid(), len(os.getgroups()), caps[0] | caps[1] | caps[3] | caps[4])\n"
        "try:\n    os.setuid(0)\n    print('became root')\nexcept OSError:\n    print('stays')\n")
    uid, euid, gid, groups, capabilities, stays = result.stdout.split()
    assert capabilities == "0" and stays == "stays", result  # no capability, effective or permitted
    if ROOT:
        assert uid == euid == gid != "0" and int(uid) != sandbox.NOBODY and groups == "0"
    else:
        assert int(uid) == os.getuid()


# ---------------------------------------------------------------------------------------------------------------
# Files

@pytest.fixture
def open_folder():
    """A folder anyone may write to (so file permissions alone would not stop the sandbox's user)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o777)
        yield pathlib.Path(folder)


def test_writes_outside_its_directory_are_stopped(box, open_folder):
    target, victim = open_folder / "written.txt", open_folder / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    attempts = [f"open({str(target)!r}, 'w').write('x')", f"import os; os.remove({str(victim)!r})",
                f"import shutil; shutil.rmtree({str(open_folder)!r})", f"import pathlib; pathlib.Path({str(target)!r}).touch()",
                f"open({str(victim)!r}, 'a').write('changed')", f"import os; os.chmod({str(victim)!r}, 0)",
                f"import os; os.utime({str(victim)!r}, (0, 0))", f"import os; os.truncate({str(victim)!r}, 0)",
                f"import os; os.rename({str(victim)!r}, {str(target)!r})",
                f"import os; os.symlink('/etc/passwd', {str(target)!r})",
                # around any Python-level guard: the posix module and libc itself
                f"import posix; posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)",
                f"import ctypes; fd = ctypes.CDLL(None).open({str(target).encode()!r}, 0o101, 0o666)\nassert fd >= 0"]
    for program in attempts:
        assert not box.run(program).success, program
    assert sorted(os.listdir(open_folder)) == ["victim.txt"] and victim.read_text() == "keep me"
    assert victim.stat().st_mode & 0o777 == 0o666 and victim.stat().st_mtime > 0
    inside = box.run("import os\nos.makedirs('a/b')\nopen('a/b/notes.txt', 'w').write('x')\nos.remove('a/b/notes.txt')\n"
                     "import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'y')\nprint('ok')")
    assert inside.success and inside.stdout == "ok\n", inside


def test_total_written_is_capped(box):
    # every file is under RLIMIT_FSIZE; together they are over the cap, which holds for the total. With namespaces
    # the tmpfs refuses the write that would pass it; the fallback's runner notices within TICK_SECONDS (the program
    # may finish meanwhile) and fails the run
    files = MAX_DISK_BYTES // 2**20 + 24
    program = (f"for i in range({files}):\n    with open(f'file{{i}}', 'wb') as f:\n        f.write(bytes(2**20))\n"
               "print('wrote all', flush=True)\n")
    many = f"for i in range({MAX_FILES + 100}):\n    open(f'f{{i}}', 'w').close()\nprint('wrote all', flush=True)\n"
    for result in (box.run(program, timeout=30), box.run(many, timeout=30)):  # slow only on a busy disk
        assert not result.success, result
        if box.name == "namespaces":
            assert "No space left on device" in result.error and "wrote all" not in result.stdout, result
        else:
            assert "more than the sandbox allows" in result.error, result
    half = box.run(program.replace(str(files), str(MAX_DISK_BYTES // 2**20 // 2)), timeout=30)
    assert half.success, half  # half the cap is fine


def test_reads_outside_system_and_python_folders_are_stopped(box):
    # a file anyone may read, outside the system's and Python's folders: this test's own source; the home folder
    result = box.run(f"for path in ({os.path.abspath(__file__)!r}, {os.path.expanduser('~')!r}):\n    try:\n"
                     f"        open(path).read() if path.endswith('.py') else __import__('os').listdir(path)\n"
                     "        print('read', path)\n    except OSError as e:\n        print(e.strerror)\n")
    if sandbox.landlock_abi() or box.name == "fallback":  # the fallback always has Landlock
        assert "read" not in result.stdout.split(), result
    else:  # namespaces on a kernel without Landlock: only file permissions stop reads
        assert "Permission denied" in result.stdout or "read" in result.stdout


def test_host_processes_are_out_of_sight(box):
    mark = marker()
    bystander = subprocess.Popen(["sleep", mark])
    try:
        result = box.run(
            "import os\ntry:\n    pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "    print('listed', len(pids))\nexcept OSError as e:\n    print('refused', e.strerror)\n    pids = []\n"
            "seen = []\nfor pid in pids + ['%d']:\n    try:\n        seen += [pid] if '%s' in open(f'/proc/{pid}/cmdline').read() else []\n"
            "    except OSError:\n        pass\nprint('seen' if seen else 'unseen')\n" % (bystander.pid, mark))
        assert processes_with(mark)  # it is there for the host to see
        assert result.stdout.splitlines()[-1] == "unseen", result
        if box.name == "namespaces":  # a fresh procfs: its own few processes only
            assert result.stdout.startswith("listed") and int(result.stdout.split()[1]) < 5, result
        else:  # Landlock: no /proc at all
            assert result.stdout.startswith("refused Permission denied"), result
    finally:
        bystander.kill()
        bystander.wait()


def test_tmp_run_and_shm_are_private(box):
    name = f"nanochat-test-{uuid.uuid4().hex[:8]}"
    folders = [f for f in ("/tmp", "/var/tmp", "/dev/shm", "/run") if os.access(f, os.W_OK)]
    for folder in folders:
        pathlib.Path(folder, name).write_text("host")
    try:
        result = box.run("import os\nfor folder in %r:\n    try:\n        print(folder, %r in os.listdir(folder))\n"
                         "        open(os.path.join(folder, %r + '-sandbox'), 'w').write('x')\n"
                         "    except OSError as e:\n        print(folder, e.strerror)\n" % (folders, name, name))
        assert result.success and len(result.stdout.splitlines()) == len(folders), result
        for line in result.stdout.splitlines():
            if box.name == "namespaces":  # listed without the host's file, and writable (/tmp and /var/tmp are one)
                assert line.endswith(" False"), result
            else:  # Landlock keeps the fallback out of them
                assert line.endswith("Permission denied"), result
        for folder in folders:
            assert not os.path.exists(os.path.join(folder, name + "-sandbox"))  # nothing reached the host
    finally:
        for folder in folders:
            os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------------------------
# Network and host Unix sockets

def test_no_network(box):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        result = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not result.success
        with pytest.raises(socket.timeout):
            server.accept()  # the sandbox never reached us


@pytest.mark.parametrize("where", ["tmp", "outside tmp", "abstract"])
def test_host_unix_sockets_are_unreachable(box, where):
    # a listening socket anyone may connect to: in /tmp (hidden by the private /tmp with namespaces), in a folder no
    # mount hides (the tests' folder), and in the abstract namespace (no file at all)
    if where == "abstract":
        address = f"\0nanochat-test-{uuid.uuid4().hex}"
        folder = contextlib.nullcontext()
    else:
        parent = None if where == "tmp" else os.path.dirname(os.path.abspath(__file__))
        if parent and not os.access(parent, os.W_OK):
            pytest.skip(f"{parent} is not writable here")
        folder = tempfile.TemporaryDirectory(dir=parent)
    with folder as path, socket.socket(socket.AF_UNIX) as server:
        if path:
            os.chmod(path, 0o777)
            address = os.path.join(path, "socket")
        server.bind(address)
        if path:
            os.chmod(address, 0o777)
        server.listen()
        server.settimeout(0.2)
        with socket.socket(socket.AF_UNIX) as client:  # control: it answers a client on the host
            client.connect(address)
            server.accept()[0].close()
        result = box.run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\nprint('in')")
        assert not result.success and result.stdout == "", result
        with pytest.raises(socket.timeout):
            server.accept()


# ---------------------------------------------------------------------------------------------------------------
# Where the sandbox runs

def test_uses_namespaces_where_the_machine_allows():
    flags = ["--mount", "--net", "--pid", "--fork"] + ([] if ROOT else ["--user", "--map-current-user"])
    try:
        allowed = subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0
    except FileNotFoundError:  # no unshare tool: nothing to compare with
        pytest.skip("no unshare command to compare with")
    try:
        assert (execute_code("print('hi')").isolation == "namespaces") == allowed
    except SandboxUnavailable:
        assert not allowed


@pytest.mark.skipif(not ROOT, reason="the refusal is for root")
def test_root_fallback_refuses_a_python_its_uid_cannot_read():
    stdlib = os.path.dirname(os.__file__)
    if os.access(stdlib, os.R_OK) and all(os.stat(p).st_mode & 0o005 == 0o005 for p in pathlib.Path(stdlib).parents):
        pytest.skip("this Python is readable by every user: nothing to refuse")
    with pytest.raises(SandboxUnavailable, match="cannot read Python's standard library") as refusal:
        execute_code("print('hi')", namespaces=False, python=sys.executable)
    message = str(refusal.value)
    assert "NANOCHAT_SANDBOX_PYTHON" in message and "CAP_SYS_ADMIN" in message and "namespaces=False" in message


AS_A_USER = """
import json, os, signal, subprocess, sys
sys.path.insert(0, {repo!r})
from nanochat.execution import execute_code
bystander = subprocess.Popen(["sleep", "60"])  # a process of the same user, as the caller is
program = '''
import os, signal
for pid in (-1, os.getppid(), {{caller}}, {{bystander}}):  # kill(0) is tried by the forgery
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
for attempt in ("open({mine!r}, 'a').write('changed')", "os.chmod({mine!r}, 0o777)", "open('/proc/{{caller}}/environ').read()",
                "os.listdir({home!r})"):
    try:
        exec(attempt)
        print('done:', attempt)
    except OSError:
        pass
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(ready_w, b'x')
        os.execv('/bin/sleep', ['sleep', '{mark}'])
    os._exit(0)
os.read(ready_r, 1)
print('daemon started')
'''.format(caller=os.getpid(), bystander=bystander.pid)
report = {{}}
for namespaces in (True, False):
    result = execute_code(program, namespaces=namespaces, python=sys.executable)
    forged = execute_code({forgery!r}, test={test!r}, entry_point="add", namespaces=namespaces, python=sys.executable)
    report[result.isolation] = [result.success, result.stdout, forged.success, forged.error]
report["bystander alive"] = bystander.poll() is None
bystander.kill()
print(json.dumps(report))
"""


@pytest.mark.skipif(not ROOT, reason="it starts the caller as another user, which needs root")
def test_as_an_unprivileged_user(fallback_python):
    # the same-uid cases: the program shares its uid with the runner, the caller and the user's other processes
    uid, mark, repo = sandbox.pick_sandbox_uid(), marker(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    home = tempfile.mkdtemp()
    try:
        mine = os.path.join(home, "mine.txt")
        pathlib.Path(mine).write_text("mine")
        for path in (home, mine):
            os.chown(path, uid, uid)
        as_user = dict(user=uid, group=uid, extra_groups=[], env={"HOME": home, "PATH": "/usr/bin:/bin"}, cwd=home)
        if subprocess.run([fallback_python, "-c", f"import os; assert os.access({repo!r}, os.R_OK | os.X_OK)"],
                          **as_user).returncode:
            pytest.skip("another user cannot read this repository")
        script = AS_A_USER.format(repo=repo, mine=mine, home=home, mark=mark, test=ADD_TEST,
                                  forgery=FORGERIES["kill the runner"])
        run = subprocess.run([fallback_python, "-c", script], capture_output=True, text=True, timeout=120, **as_user)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report.pop("bystander alive") and sorted(report) == ["fallback", "namespaces"], report
        for success, stdout, forged, error in report.values():
            assert success and stdout == "daemon started\n", report  # it ran, and nothing else worked
            assert not forged and "runner failed" not in error, report
        assert pathlib.Path(mine).read_text() == "mine" and os.stat(mine).st_mode & 0o777 == 0o644
        assert processes_with(mark) == []
    finally:
        shutil.rmtree(home)
