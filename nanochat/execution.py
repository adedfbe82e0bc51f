"""
Run model-written Python in a sandbox.
  execute_code(code) -> ExecutionResult: success = the program ran to its end without an exception.
  execute_code(code, test=..., entry_point=...): success = the test's check(candidate) passed, candidate being the
      program's function entry_point (HumanEval, tasks/humaneval.py): a verdict the program cannot forge (below).

Processes. execute_code starts a runner (nanochat/sandbox_runner.py, `python -I -S`: the standard library only, no
site-packages), in a session of its own. The runner is trusted and not confined: it forks the program's process,
which confines itself before running a line of the program, then supervises and judges it.
  namespaces: runner -> C (unshares) -> P, pid 1 of a new PID namespace, runs the program
  fallback:   runner -> S runs the program; used where unshare fails (Docker's default seccomp profile, sysctls that
              forbid unprivileged user namespaces) or with namespaces=False (the tests use it)
What the program's process gets, in this order (nanochat/sandbox.py has the mechanisms):
  1. namespaces only: a private tmpfs of MAX_DISK_BYTES behind /tmp (its directory), /var/tmp, /run and /dev/shm;
     a fresh /proc; the rest read-only; no network but a loopback of its own; IPC and hostname of its own.
  2. rlimits: address space and data (maximum_memory_bytes), CPU time, file size, MAX_PROCESSES, no core dumps.
  3. root runs it as a random unused uid: no capabilities, and RLIMIT_NPROC applies (the kernel exempts root). If
     that uid cannot read Python's standard library (e.g. Python under /root, in the fallback, where it cannot be
     bind-mounted elsewhere) the call raises SandboxUnavailable, saying what to do. Other users keep their uid and
     drop every capability.
  4. Landlock: reads only below the system's and Python's folders (no home directories, no data sets, no host /proc
     in the fallback), writes only below its own folders. Required by the fallback (SandboxUnavailable without
     it), used with namespaces where the kernel has it.
  5. seccomp: no sockets (no network, no host Unix sockets), signals only to itself, no ptrace or other process'
     memory, no new namespaces or mounts, no chmod/chown/utime/xattr/truncate by path, no SysV IPC.
Supervision by the runner: `timeout` seconds from the end of the setup; in the fallback the directory's size and
file count are checked every TICK_SECONDS (a program can overshoot by what it writes in that time; with namespaces
the tmpfs caps it exactly). Afterwards every process the program started is killed and reaped before execute_code
returns: the runner is a child subreaper, so double-forked daemons come back to it, and a PID namespace dies with
its pid 1.

The verdict. The program's process is entirely the program's: anything in it (a token, a pipe, the harness' frames,
assert, builtins, sys.exit, os._exit, stdout) can be read or faked, so nothing in it decides. The test (and
test_setup: the problem's prompt, whose helpers some tests call) runs in the runner. check() gets a stand-in for the
program's function: each call sends its arguments as plain data, the program's process calls the function and
answers with the result as plain data (numbers, strings, bytes, None and lists, tuples, sets, dicts of them), which
the runner reads with ast.literal_eval: no code of the program ever runs in the runner (no __eq__ that is always
True, no patched assert, no trace function skipping lines). The verdict relies on: (1) the runner being out of the
program's reach: another uid (root's), or outside its PID namespace, or in the fallback as the same user,
PR_SET_DUMPABLE 0 plus Landlock and seccomp refusing ptrace, process memory and signals; (2) the test never being in
the program's address space: the runner reads it from its stdin only after forking the program; (3) the program
controlling nothing but its answers. A program that exits early (any status) leaves check() with a call that fails.
Without test= success is the program's own word (it says it ran to its end, which it can claim however it likes):
never append trusted tests to untrusted code, pass them as test=.

Where it is weaker (and the tests assert so): with namespaces on a kernel without Landlock, the program can read
files that every user may read (file permissions are all that stops it); in the fallback /tmp, /run and /dev/shm
are not private but out of reach (Landlock), and the directory's size is polled, not capped; without seccomp (other
architectures than x86_64 and aarch64) namespaces still hide /tmp's and /run's sockets but not ones elsewhere.
"""


import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from nanochat import sandbox_runner
from nanochat.sandbox_runner import SETUP_SECONDS

OUTPUT_CHARS = 16 * 1024  # how much of stdout/stderr comes back


@dataclass
class ExecutionResult:
    success: bool  # the test passed (with test=), or the program ran to its end without an exception
    stdout: str
    stderr: str
    error: str | None = None  # why it failed: the test's or the program's exception, or why it was stopped
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: str = ""  # "namespaces" or "fallback" (see the module docstring)


class SandboxUnavailable(RuntimeError):
    """This machine offers no isolation the sandbox accepts; the message says what to change."""


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, test=None, entry_point=None,
                 test_setup="", namespaces=True, python=None):
    """
    Run `code` in the sandbox. With test= (code that defines check(candidate), HumanEval's format), success means
    check(candidate) passed, candidate calling the program's function entry_point; test_setup is trusted code run
    before the test (the problem's prompt). namespaces=False forces the fallback. python: the interpreter
    (default: $NANOCHAT_SANDBOX_PYTHON, else this one). Raises SandboxUnavailable where no isolation is possible.
    """
    if test is not None and not entry_point:
        raise ValueError("execute_code(test=...) needs entry_point=, the name of the program's function that check() "
                         "tests")
    python = python or os.environ.get("NANOCHAT_SANDBOX_PYTHON") or sys.executable
    scratch = tempfile.mkdtemp(prefix="nanochat-exec-")
    try:
        workdir = os.path.join(scratch, "work")
        os.mkdir(workdir, 0o700)
        os.chmod(scratch, 0o711)  # root's sandbox uid may pass through to workdir, not list stdout and stderr
        verdict_r, verdict_w = os.pipe()
        program = repr(dict(code=code, entry_point=entry_point, testing=test is not None, workdir=workdir,
                            timeout=timeout, memory_bytes=maximum_memory_bytes, namespaces=namespaces,
                            verdict_fd=verdict_w)).encode()
        judge = repr(dict(test=test, test_setup=test_setup)).encode()  # the runner reads it after forking
        with open(os.path.join(scratch, "stdout"), "w+b") as out, open(os.path.join(scratch, "stderr"), "w+b") as err:
            try:
                runner = subprocess.Popen([python, "-I", "-S", sandbox_runner.__file__], stdin=subprocess.PIPE,
                                          stdout=out, stderr=err, pass_fds=(verdict_w,), start_new_session=True,
                                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            finally:
                os.close(verdict_w)
            try:
                runner.communicate(b"%d\n" % len(program) + program + judge, timeout=timeout + SETUP_SECONDS + 5)
            except subprocess.TimeoutExpired:  # the runner enforces the timeout itself; this is the last resort
                os.killpg(runner.pid, signal.SIGKILL)
                runner.wait()
            verdict = read_verdict(verdict_r)
            stdout, stderr = read_head(out), read_head(err)
    finally:
        remove_tree(scratch)
    if verdict is None:
        verdict = dict(passed=False, timeout=runner.returncode == -signal.SIGKILL, isolation="",
                       error=f"the sandbox's runner failed (exit status {runner.returncode})")
    if verdict.get("refused"):
        raise SandboxUnavailable(verdict["refused"])
    error = verdict["error"]
    if not verdict["passed"] and error is None:  # the program's own exception, from its traceback
        lines = stderr.strip().splitlines()
        error = lines[-1] if lines else "the program exited before its end"
    return ExecutionResult(verdict["passed"], stdout, stderr, None if verdict["passed"] else error, verdict["timeout"],
                           "MemoryError" in stderr or "MemoryError" in (error or ""), verdict["isolation"])


def read_verdict(fd):
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)  # one short write, already there since the runner exited
    except BlockingIOError:
        data = b""
    os.close(fd)
    try:
        return ast.literal_eval(data.decode())
    except (ValueError, SyntaxError):
        return None


def read_head(f):
    f.seek(0)
    return f.read(OUTPUT_CHARS).decode("utf-8", errors="replace")


def remove_tree(path):
    """rmtree, after making every folder listable (a program may leave one at mode 000; root ignores modes)."""
    if os.geteuid() != 0:
        for root, folders, _ in os.walk(path):
            for folder in folders:
                if not os.path.islink(os.path.join(root, folder)):
                    os.chmod(os.path.join(root, folder), 0o700)
    shutil.rmtree(path, ignore_errors=True)
