"""
Run model-written Python (HumanEval solutions) in a sandbox: execute_code(code) -> ExecutionResult.

Each program runs in a fresh interpreter (`python -I this_file`), in its own session, with a clean
environment (no tokens or keys from ours), in a new temporary directory that is deleted afterwards.
Always applied, by the kernel:
  - time: the whole session is SIGKILLed after `timeout` s (+1 s to start the interpreter); RLIMIT_CPU backs it up
  - memory: RLIMIT_AS and RLIMIT_DATA = maximum_memory_bytes; files: RLIMIT_FSIZE; no core dumps
  - processes: RLIMIT_NPROC (fork bombs stop at MAX_PROCESSES); PR_SET_NO_NEW_PRIVS (setuid binaries gain nothing)
Then the strongest isolation the machine allows, tried in this order:
  1. Linux namespaces (as root, or as any user where unprivileged user namespaces are enabled): unshare() into a new
     network namespace (only a loopback of its own: no network at all), a new PID namespace (the program is its
     pid 1: when it ends, every process it started dies) and a new mount namespace in which every mount is
     remounted read-only (mount_setattr, recursive) except a bind mount of the temporary directory. Then it drops
     privileges: root becomes `nobody` (which also makes RLIMIT_NPROC apply: the kernel exempts root), other users
     drop all capabilities, so the program cannot undo the mounts. Writing outside its directory fails with EROFS.
  2. Otherwise, Python-level guards as the reference uses: socket, fork/exec/subprocess and the destructive os and
     shutil functions are replaced by ones that raise, and open() refuses to write outside the directory. These stop
     mistakes, not an adversary (ctypes or the posix module get around them). Root still drops to `nobody`, so
     root-owned files stay protected by file permissions.
ExecutionResult.isolation says which one applied. On this project's CI machine (root, kernel 6.x) it is "namespaces".
"""

import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

NOBODY = 65534  # uid/gid that root drops to
MAX_PROCESSES = 32  # RLIMIT_NPROC for the program's user (per sandbox with namespaces; shared by parallel ones as root)
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: also caps stdout/stderr, which go to files
OUTPUT_CHARS = 16 * 1024  # how much of stdout/stderr comes back
START_SECONDS = 1.0  # allowance for the fresh interpreter to start, on top of the program's timeout


@dataclass
class ExecutionResult:
    success: bool  # ran to the end without an exception
    stdout: str
    stderr: str
    error: str | None = None  # last line of the traceback, or why it was stopped
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: str = ""  # "namespaces" or "guards" (see the module docstring)


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, isolate=True):
    """Run `code` as a program in the sandbox. isolate=False skips the namespaces (to test the fallback)."""
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    outdir = tempfile.mkdtemp(prefix="nanochat-exec-out-")  # stdout/stderr files, outside the program's reach
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        library_root = os.path.join(outdir, "lib")  # where a root sandbox mounts sys.path for nobody to read
        os.mkdir(library_root)
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the program runs as nobody and must write here
            os.chmod(outdir, 0o711)
            os.chmod(library_root, 0o755)
        # written to done_w only if the program ran to its end (os._exit(0) is no success)
        token = secrets.token_hex(16)
        done_r, done_w = os.pipe()
        config = dict(workdir=workdir, library_root=library_root, done_fd=done_w, isolate=isolate,
                      cpu_seconds=int(timeout) + 2, memory_bytes=maximum_memory_bytes)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        with open(os.path.join(outdir, "out"), "w+b") as out, open(os.path.join(outdir, "err"), "w+b") as err:
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)],
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    pass_fds=(done_w,), start_new_session=True)
            os.close(done_w)
            timed_out = False
            try:
                proc.communicate(input=(token + "\n").encode(), timeout=timeout + START_SECONDS)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session (with namespaces, all of it)
            except ProcessLookupError:
                pass
            proc.wait()
            os.set_blocking(done_r, False)
            try:
                finished = os.read(done_r, 64).decode() == token
            except BlockingIOError:
                finished = False
            os.close(done_r)
            stdout, stderr = (read_head(f) for f in (out, err))
        isolation, _, stderr = stderr.partition("\n") if stderr.startswith("isolation=") else ("", "", stderr)
        memory_exceeded = "MemoryError" in stderr
        success = finished and proc.returncode == 0 and not timed_out
        error = None
        if timed_out:
            error = f"timed out after {timeout} s"
        elif not success:
            lines = stderr.strip().splitlines()
            error = lines[-1] if lines else f"exit status {proc.returncode}"
        return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded,
                               isolation.removeprefix("isolation="))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


def read_head(f):
    f.seek(0)
    return f.read(OUTPUT_CHARS).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Everything below runs inside the sandbox process, in the fresh interpreter.

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and arm64
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def libc_call(name, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def enter_namespaces(workdir, library_root):
    """
    New network, PID and mount namespaces, then a read-only filesystem except workdir.
    Returns (namespaces entered, filesystem read-only); (False, False) where the kernel or container forbids it.
    As root it also bind-mounts every sys.path folder under library_root and points sys.path there: Python is often
    installed under /root (mode 700), where `nobody` could not import the standard library from.
    """
    uid, gid = os.getuid(), os.getgid()
    try:
        libc_call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if uid == 0 else CLONE_NEWUSER))
        if uid != 0:  # in the new user namespace, stay ourselves (with capabilities over the new namespaces only)
            for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
    except OSError:
        return False, False
    path = workdir.encode()
    readonly, writable = MountAttr(attr_set=MOUNT_ATTR_RDONLY), MountAttr(attr_clr=MOUNT_ATTR_RDONLY)
    try:
        libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing done here reaches the host
        libc_call("mount", path, path, None, MS_BIND, None)  # workdir becomes a mount of its own...
        if uid == 0:
            moved = {}
            for i, folder in enumerate(sys.path):
                if os.path.isdir(folder):
                    moved[folder] = os.path.join(library_root, str(i))
                    os.mkdir(moved[folder])
                    libc_call("mount", folder.encode(), moved[folder].encode(), None, MS_BIND | MS_REC, None)
                    sys.path[i] = moved[folder]
            # packages already imported (encodings, ...) find submodules there too
            for module in list(sys.modules.values()):
                if isinstance(getattr(module, "__path__", None), list):
                    module.__path__[:] = [relocate(p, moved) for p in module.__path__]
            sys.path_importer_cache.clear()
        # the whole tree read-only, then the working folder left writable
        libc_call("syscall", SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(readonly),
                  ctypes.sizeof(readonly))
        libc_call("syscall", SYS_MOUNT_SETATTR, AT_FDCWD, path, 0, ctypes.byref(writable), ctypes.sizeof(writable))
    except OSError:  # e.g. a kernel before 5.12 (no mount_setattr): isolated network, guarded files
        return True, False
    return True, True


def relocate(path, moved):
    for old, new in moved.items():
        if path == old or path.startswith(old + os.sep):
            return new + path[len(old):]
    return path


def world_readable(folder):
    """Can any user list folder (every folder above it searchable by others)?"""
    import stat
    modes = [os.stat(folder).st_mode & stat.S_IROTH]
    while folder != os.path.dirname(folder):
        modes.append(os.stat(folder).st_mode & stat.S_IXOTH)
        folder = os.path.dirname(folder)
    return all(modes)


def count_tasks(uid):
    """Processes and threads of uid right now (RLIMIT_NPROC counts them all, host-wide, outside namespaces)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields["Threads"]) if int(fields["Uid"].split()[0]) == uid else 0
        except (OSError, KeyError, ValueError):
            pass
    return total


def limit_and_drop_privileges(config, isolated):
    """Resource limits, then give up root (or, in namespaces, every capability)."""
    memory = config["memory_bytes"]
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_CPU, config["cpu_seconds"]), (resource.RLIMIT_FSIZE, MAX_FILE_BYTES)):
        resource.setrlimit(limit, (value, value))
    stdlib = next(folder for folder in sys.path if os.path.exists(os.path.join(folder, "traceback.py")))
    if os.getuid() == 0 and world_readable(stdlib):  # else nobody could not import the standard library
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)  # after this no capabilities: the mounts and namespaces stay as they are
        processes = MAX_PROCESSES
    else:
        processes = MAX_PROCESSES if isolated else count_tasks(os.getuid()) + MAX_PROCESSES
        if isolated:  # capset(all zero): no capabilities left in our user namespace either
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
            libc_call("capset", header, (ctypes.c_uint32 * 6)())
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # if the runner is killed, so are we


def install_guards(workdir, block_network):
    """
    The fallback without namespaces: stop (non-malicious) network use, process creation and writes
    outside workdir.
    """
    import builtins, io, shutil as shutil_module, socket, subprocess as subprocess_module
    root = os.path.realpath(workdir)

    def inside(path):
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refused

    def only_inside(name, function):
        def guarded(*args, **kwargs):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if "dir_fd" in kwargs or "src_dir_fd" in kwargs or not all(inside(p) for p in paths):
                raise PermissionError(f"{name} outside the sandbox directory is not allowed")
            return function(*args, **kwargs)
        return guarded

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} outside the sandbox directory is not allowed")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writes and ("dir_fd" in kwargs or not inside(path)):
            raise PermissionError(f"writing {path!r} outside the sandbox directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
                 "chown", "lchown", "link", "symlink", "mkdir", "makedirs", "utime"):
        setattr(os, name, only_inside(f"os.{name}", getattr(os, name)))
    for name in ("rmtree", "move", "copyfile", "copy", "copy2", "copytree", "chown"):
        setattr(shutil_module, name, only_inside(f"shutil.{name}", getattr(shutil_module, name)))
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "execv", "execve", "execvp",
                 "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "chroot", "fchdir", "chdir", "putenv"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    subprocess_module.Popen = refuse("subprocess")
    if block_network:
        socket.socket = refuse("network access")
        socket.create_connection = refuse("network access")


def sandbox_main(config):
    token = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the program reads nothing
    workdir, done_fd = config["workdir"], config["done_fd"]
    isolated, readonly = enter_namespaces(workdir, config["library_root"]) if config["isolate"] else (False, False)
    label = "namespaces" if readonly else "network namespace + file guards" if isolated else "guards"
    print(f"isolation={label}", file=sys.stderr, flush=True)
    if isolated:  # the runner stays outside the new PID namespace; its child is pid 1 there and runs the program
        pid = os.fork()
        if pid:
            os.close(done_fd)
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) % 256)
    limit_and_drop_privileges(config, isolated)
    os.chdir(workdir)
    if not readonly:
        install_guards(workdir, block_network=not isolated)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException:  # SystemExit included: a program that exits early did not pass
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(done_fd, token.encode())
    os._exit(0)


if __name__ == "__main__":
    sandbox_main(json.loads(sys.argv[1]))
