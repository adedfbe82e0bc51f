"""
The sandbox's runner: the process execute_code (nanochat/execution.py, whose docstring describes the design) starts
as `python -I -S sandbox_runner.py`. It forks the program's process, which confines itself (nanochat/sandbox.py)
before running a line of the program, then supervises it, runs the test and writes the verdict. It imports little:
its start-up is most of the sandbox's cost per program.

Input (stdin): a decimal length and a newline, the program's settings as a Python literal (a dict), then the test's
(read only after the program's process is forked). Output: the verdict, a dict literal, on the file descriptor
the settings name. Messages between the runner and the program's process: one literal tuple per line.
"""

import ast
import builtins
import contextlib
import math
import os
import resource
import select
import signal
import sys
import time

try:
    from nanochat import sandbox
except ImportError:  # run as a script with -I, which leaves the repository off sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nanochat import sandbox
    del sys.path[0]

MAX_PROCESSES = 32  # RLIMIT_NPROC: fork bombs stop here
MAX_DISK_BYTES = 16 * 1024 * 1024  # everything the program writes, together; also RLIMIT_FSIZE (stdout, stderr)
MAX_FILES = 4096  # files and folders it may create
MAX_MESSAGE_BYTES = 1024 * 1024  # the largest answer of the program's function
SETUP_SECONDS = 10.0  # for the sandbox to be set up (not counted in the program's timeout)
TICK_SECONDS = 0.02  # how often the runner checks the deadline (and, in the fallback, the directory's size)
NAMESPACES_HINT = ("To let it use namespaces: as root, the process needs CAP_SYS_ADMIN (Docker: --cap-add SYS_ADMIN); "
                   "as another user, unprivileged user namespaces must be allowed (sysctl "
                   "kernel.unprivileged_userns_clone=1; Ubuntu 24.04+: kernel.apparmor_restrict_unprivileged_userns=0; "
                   "Docker: --security-opt seccomp=unconfined).")

# Plain data across the pipes: both ends write it with literal(), the runner reads with ast.literal_eval.

def literal(value):
    """Python source of plain data; TypeError for anything else (e.g. an object with its own __eq__)."""
    if value is None or value is True or value is False:
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            raise TypeError("nan cannot be passed between the program and the test")
        return repr(float(value)) if math.isfinite(value) else ("1e999" if value > 0 else "-1e999")
    for kind in (int, complex, str, bytes):  # subclasses (IntEnum, str enums, ...) travel as the base type
        if isinstance(value, kind):
            return repr(kind(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [literal(item) for item in value]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        if isinstance(value, tuple):
            return "(" + "".join(item + ", " for item in items) + ")"
        return "{" + ", ".join(items) + "}" if items else "set()"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"a {type(value).__name__} is not plain data (numbers, strings, bytes, None, and lists, tuples, "
                    "sets and dicts of them), so it cannot be passed between the program and the test")


def send(stream, message):
    stream.write(literal(message).encode() + b"\n")
    stream.flush()


class SandboxStop(BaseException):
    """Ends a run from the runner; a BaseException, so the test's own `except Exception` cannot swallow it."""


class ProgramTimeout(SandboxStop):
    pass


class ProgramGone(SandboxStop):
    pass


class ProtocolBroken(SandboxStop):
    pass


def program_exception(name, message):
    """The program's exception as the test sees it: the built-in exception of that name, else a RuntimeError."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except TypeError:  # one whose constructor wants more (UnicodeDecodeError)
            pass
    return RuntimeError(f"{name}: {message}")


class ProgramChannel:
    """The runner's end of the pipes to the program's process (pid: the runner's child on that side)."""

    def __init__(self, pid, requests_fd, replies_fd):
        self.pid, self.replies, self.buffer = pid, replies_fd, b""
        self.requests = os.fdopen(requests_fd, "wb")

    def exited(self):
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True

    def read(self):
        """The next message as a non-empty tuple; None once the process has exited (its daemons may hold the pipe)."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_MESSAGE_BYTES:
                raise ProtocolBroken(f"the program sent an answer of over {MAX_MESSAGE_BYTES} bytes")
            if not select.select([self.replies], [], [], 0.1)[0]:
                if self.exited() and not select.select([self.replies], [], [], 0)[0]:
                    return None
                continue
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = ast.literal_eval(line.decode())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
            message = None
        if not isinstance(message, tuple) or not message:
            raise ProtocolBroken("the program sent something other than plain data")
        return message

    def function(self, name):
        """The stand-in for the program's function `name` that check() calls."""
        def candidate(*args, **kwargs):
            try:
                send(self.requests, ("call", args, kwargs))
            except BrokenPipeError:
                raise ProgramGone(f"the program's process ended before a call to {name}") from None
            reply = self.read()
            if reply is None:
                raise ProgramGone(f"the program's process ended during a call to {name}")
            if reply[0] == "return" and len(reply) == 2:
                return reply[1]
            if reply[0] == "raise" and len(reply) == 3 and all(isinstance(part, str) for part in reply[1:]):
                raise program_exception(reply[1], reply[2])
            raise ProtocolBroken("the program answered a call with something else than a result or an exception")
        return candidate

    def close(self):
        with contextlib.suppress(OSError):
            self.requests.close()
        os.close(self.replies)


# ---------------------------------------------------------------------------------------------------------------
# The runner

def runner_main():
    program = ast.literal_eval(read_exactly(0, int(read_line(0))).decode())  # the test stays in the pipe for now
    judge_fd = os.dup(0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the program reads nothing
    sandbox.become_subreaper()
    try:
        verdict = run(program, judge_fd)
    finally:
        sandbox.kill_descendants()
    for key in ("error", "refused"):  # the verdict goes in one short write
        verdict[key] = verdict.get(key) and verdict[key][:2000]
    os.write(program["verdict_fd"], repr(verdict).encode())


def run(program, judge_fd):
    """Namespaces if they can be set up, else the fallback if this machine allows it; then supervise."""
    uid = sandbox.pick_sandbox_uid() if os.getuid() == 0 else None
    why_not = "turned off by namespaces=False"
    failed = dict(passed=False, timeout=False, isolation="")
    if program["namespaces"]:
        channel, message = start_program(program, uid, judge_fd, in_namespaces=True)
        if message and message[0] == "setup":
            return supervise(program, channel, judge_fd, "namespaces")
        why_not = message[1] if message else "setting them up failed (see stderr)"
        channel.close()
        sandbox.kill_descendants()
    needs = []
    if not sandbox.landlock_abi():
        needs.append("Landlock (Linux 5.13 or later, with landlock in the kernel's lsm= list)")
    if not sandbox.seccomp_supported():
        needs.append(f"seccomp filters, which this sandbox has for x86_64 and aarch64 only (not {os.uname().machine})")
    if needs:
        return dict(failed, refused=f"The code sandbox cannot run programs here: namespaces are unavailable "
                                    f"({why_not}) and the fallback needs {' and '.join(needs)}. {NAMESPACES_HINT}")
    channel, message = start_program(program, uid, judge_fd, in_namespaces=False)
    if message and message[0] == "refused":
        return dict(failed, refused=f"{message[1]} Namespaces are unavailable: {why_not}. {NAMESPACES_HINT}")
    if not message or message[0] != "setup":
        return dict(failed, error="the sandbox could not be set up (see stderr)")
    return supervise(program, channel, judge_fd, "fallback")


def start_program(program, uid, judge_fd, in_namespaces):
    """Fork the program's process; returns (channel, its first message: setup, unavailable or refused; or None)."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (requests_w, replies_r, judge_fd, program["verdict_fd"]):
                os.close(fd)
            sandbox.prctl(sandbox.PR_SET_DUMPABLE, 1)  # the runner's 0 would make /proc/self/uid_map root's
            requests, replies = os.fdopen(requests_r, "rb"), os.fdopen(replies_w, "wb")
            (enter_namespaces if in_namespaces else enter_fallback)(program, uid, requests, replies)
        except BaseException:
            print_traceback()
        os._exit(1)
    os.close(requests_r)
    os.close(replies_w)
    channel = ProgramChannel(pid, requests_w, replies_r)
    try:
        with deadline(SETUP_SECONDS, None):
            return channel, channel.read()
    except SandboxStop:
        return channel, None


@contextlib.contextmanager
def deadline(seconds, watched_folder):
    """Raise ProgramTimeout in the runner after `seconds`, or SandboxStop once watched_folder holds too much."""
    end, armed = time.monotonic() + seconds, True

    def stop(exception):
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise exception

    def tick(signum, frame):
        if not armed:
            return
        if time.monotonic() >= end:
            stop(ProgramTimeout(f"timed out after {seconds:g} s"))
        if watched_folder:
            size, entries = sandbox.folder_usage(watched_folder)
            if size > MAX_DISK_BYTES or entries > MAX_FILES:
                stop(SandboxStop(f"stopped: the program wrote {size / 2**20:.1f} MiB in {entries} files, more than "
                                 f"the sandbox allows ({MAX_DISK_BYTES // 2**20} MiB, {MAX_FILES} files)"))
        signal.setitimer(signal.ITIMER_REAL, TICK_SECONDS)  # one shot, re-armed here: a slow tick never nests

    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, TICK_SECONDS)
    try:
        yield
        tick(signal.SIGALRM, None)  # once more at the end: the program may have written its last files since
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def supervise(program, channel, judge_fd, isolation):
    judge = ast.literal_eval(read_all(judge_fd).decode())  # the program's process exists: the test may come in
    verdict = dict(passed=False, timeout=False, error=None, isolation=isolation)
    try:
        with deadline(program["timeout"], program["workdir"] if isolation == "fallback" else None):
            finished = channel.read() == ("done",)  # else it raised (or left) before its end: stderr says which
            if finished and program["testing"]:
                run_test(judge, program["entry_point"], channel)
        verdict["passed"] = finished  # only now: leaving the block checks the deadline and the disk a last time
    except SandboxStop as stop:
        verdict.update(timeout=isinstance(stop, ProgramTimeout), error=str(stop))
    except Exception as e:  # the test failed
        import traceback  # only once something failed: imports are most of the runner's start-up
        verdict["error"] = traceback.format_exception_only(e)[-1].strip()
    channel.close()
    return verdict


def run_test(judge, entry_point, channel):
    candidate = channel.function(entry_point)
    scope = {"__name__": "__test__"}
    exec(compile(judge["test_setup"], "test_setup", "exec"), scope)
    scope[entry_point] = candidate  # in place of the prompt's stub: some tests call it by name
    exec(compile(judge["test"], "test", "exec"), scope)
    if not callable(scope.get("check")):
        raise ValueError("the test defines no check(candidate) function")
    scope["check"](candidate)


def read_line(fd):
    line = b""
    while not line.endswith(b"\n"):
        line += read_exactly(fd, 1)
    return line


def read_exactly(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the runner's input ended early")
        data += chunk
    return data


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------------
# The program's process: confine, then run the program. Nothing below returns.

def enter_namespaces(program, uid, requests, replies):
    """C: unshare, then fork P (pid 1 in the new PID namespace), which sets up the mounts and runs the program."""
    sandbox.die_with_parent()
    try:
        sandbox.enter_namespaces()
    except OSError as e:
        return send(replies, ("unavailable", str(e)))
    pid = os.fork()
    if pid:
        requests.close()
        replies.close()
        os.waitpid(pid, 0)
        os._exit(0)
    os.setsid()  # kill(0), which seccomp allows, must reach only the program's processes, not the runner's group
    sandbox.die_with_parent()
    try:  # as root, bind Python's folders where the sandbox uid can reach them
        moved = sandbox.private_mounts(program["workdir"], MAX_DISK_BYTES, MAX_FILES,
                                       python_folders() if uid is not None else [])
    except OSError as e:
        return send(replies, ("unavailable", str(e)))
    for i, folder in enumerate(sys.path):
        sys.path[i] = relocate(folder, moved)
    for module in list(sys.modules.values()):  # packages already imported (encodings, ...) find submodules there too
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [relocate(folder, moved) for folder in module.__path__]
    sys.path_importer_cache.clear()
    confine_and_run(program, uid, requests, replies, "namespaces", home="/tmp",
                    readable=[*sandbox.SYSTEM_FOLDERS, *sandbox.DEVICES, *python_folders(), "/proc"],
                    writable=sandbox.PRIVATE_FOLDERS)


def enter_fallback(program, uid, requests, replies):
    """S: its own session, then confinement without namespaces."""
    os.setsid()
    sandbox.die_with_parent()
    workdir = program["workdir"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    confine_and_run(program, uid, requests, replies, "fallback", home=workdir,
                    readable=[*sandbox.SYSTEM_FOLDERS, *sandbox.DEVICES, *python_folders()], writable=[workdir])


def python_folders():
    return [folder for folder in sys.path if os.path.isdir(folder)]


def relocate(path, moved):
    for old, new in moved.items():
        if path == old or path.startswith(old + os.sep):
            return new + path[len(old):]
    return path


def confine_and_run(program, uid, requests, replies, isolation, home, readable, writable):
    memory, processes = program["memory_bytes"], MAX_PROCESSES
    if uid is None and isolation == "fallback":  # the user's other processes count too (this one is counted already)
        processes += sandbox.count_tasks(os.getuid()) - 1
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_CPU, int(program["timeout"]) + 2), (resource.RLIMIT_FSIZE, MAX_DISK_BYTES),
                         (resource.RLIMIT_NPROC, processes)):
        resource.setrlimit(limit, (value, value))
    ruleset = sandbox.landlock_ruleset(readable, writable) if sandbox.landlock_abi() else None
    folders = python_folders()  # before dropping privileges: after, a folder we cannot reach does not look like one
    sandbox.drop_privileges(uid)
    unreadable = [folder for folder in folders if not os.access(folder, os.R_OK | os.X_OK)]
    if any(not folder.endswith("-packages") for folder in unreadable):  # the standard library, not extra packages
        send(replies, ("refused" if isolation == "fallback" else "unavailable",
                       f"The code sandbox cannot run programs here: it runs them as an unprivileged user (uid {uid}), "
                       f"who cannot read Python's standard library in {unreadable[0]} (a folder above it is private). "
                       "Run as a user other than root, or set NANOCHAT_SANDBOX_PYTHON to a Python that every user can "
                       "read (such as /usr/bin/python3), or let the sandbox use namespaces."))
        os._exit(0)
    sys.path[:] = [folder for folder in sys.path if folder not in unreadable]
    if ruleset is not None:
        sandbox.landlock_restrict(ruleset)
    if sandbox.seccomp_supported():
        sandbox.install_seccomp(os.getpid())
    os.chdir(home)
    os.environ.update(HOME=home, TMPDIR=home)
    send(replies, ("setup", isolation))
    run_program(program, requests, replies)


def run_program(program, requests, replies):
    """Run the code; with a test, then answer the runner's calls of the function it tests."""
    with open("program.py", "w", encoding="utf-8") as f:  # for the source lines in tracebacks
        f.write(program["code"])
    scope = {"__name__": "__main__"}
    try:
        exec(compile(program["code"], "program.py", "exec"), scope)
    except BaseException:  # SystemExit included: a program that exits early did not get to its end
        print_traceback()
        flush_output()
        os._exit(1)
    flush_output()
    send(replies, ("done",))
    name = program["entry_point"]
    for line in requests if program["testing"] else []:
        _, args, kwargs = ast.literal_eval(line.decode())
        try:
            if not callable(scope.get(name)):
                raise NameError(f"the program defines no function {name}")
            answer = literal(("return", scope[name](*args, **kwargs)))
        except BaseException as e:
            print_traceback()
            answer = literal(("raise", type(e).__name__, str(e)[:1000]))
        flush_output()
        replies.write(answer.encode() + b"\n")
        replies.flush()
    os._exit(0)


def print_traceback():
    import traceback  # only once something failed: imports are most of the runner's start-up
    traceback.print_exc()


def flush_output():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    runner_main()
