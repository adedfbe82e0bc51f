"""
The kernel mechanisms that confine a process before it runs model-written code (nanochat/execution.py says in
what order it uses them and what each one guarantees):
  - namespaces: a new mount, PID, network, IPC and UTS namespace (plus a user namespace when not root), a size-capped
    tmpfs for /tmp, /var/tmp, /run and /dev/shm, a fresh /proc, everything else read-only;
  - a dedicated uid: root runs the program as a random unused uid, which owns no file, signals nobody else and
    counts its own processes for RLIMIT_NPROC (the kernel exempts root from it);
  - Landlock (Linux 5.13+, unprivileged): reads only below the system and Python folders, writes only below the
    program's own folders, no signals to processes outside (ABI 6+);
  - seccomp: no sockets, no signals to other processes, no ptrace or other process' memory, no new namespaces or
    mounts, no metadata changes Landlock does not cover (chmod, chown, utime, xattrs, truncate by path), no SysV IPC;
  - killing every descendant, which PR_SET_CHILD_SUBREAPER makes complete: orphans come back to the runner.
"""

import ctypes
import os
import signal

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long

# unshare(2) flags; CLONE_NEW_ANY is what seccomp refuses in clone(2)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
CLONE_NEW_ANY = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 22, 38, 36
NOBODY = 65534

# Folders the program may read from besides Python's own (sys.path): the interpreter's shared libraries and config
SYSTEM_FOLDERS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
PRIVATE_FOLDERS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # with namespaces: one size-capped tmpfs behind all four


def check(result, what):
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def syscall(number, *args, what="syscall"):
    return check(LIBC.syscall(number, *args), what)


def prctl(option, value):
    check(LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def mount(source, target, fstype, flags, options=None):
    encode = lambda s: None if s is None else s.encode()
    check(LIBC.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(options)),
          f"mount {target}")


# ---------------------------------------------------------------------------------------------------------------
# Namespaces

def enter_namespaces():
    """New namespaces for this process' future children; as non-root also a user namespace in which we stay ourselves."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    check(LIBC.unshare(flags | (0 if uid == 0 else CLONE_NEWUSER)), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def private_mounts(staging, size_bytes, max_files, python_folders):
    """
    Run as pid 1 of the new PID namespace, with its capabilities. Mounts one tmpfs of size_bytes at staging (a host
    folder nobody else uses) and shows it at /tmp and /var/tmp (the program's directory), /run and /dev/shm, so
    that the host's files and Unix sockets there are out of sight and everything written shares one cap; then a
    fresh /proc (only this namespace's processes), then makes everything else read-only. python_folders (given as
    root, whose dedicated uid may not reach Python's folders, e.g. under /root) are bind-mounted at /run/python/N.
    Returns {original folder: where it is now}.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_bytes},nr_inodes={max_files},mode=755")
    for name in ("tmp", "run", "shm"):
        os.mkdir(os.path.join(staging, name))
        os.chmod(os.path.join(staging, name), 0o1777)
    mount(os.path.join(staging, "run"), "/run", None, MS_BIND)
    mount(os.path.join(staging, "shm"), "/dev/shm", None, MS_BIND)
    moved = {}
    for i, folder in enumerate(python_folders):
        moved[folder] = f"/run/python/{i}"
        os.makedirs(moved[folder])
        mount(folder, moved[folder], None, MS_BIND | MS_REC)
    for folder in ("/var/tmp", "/tmp"):  # /tmp last: staging is usually below it
        if os.path.isdir(folder):
            mount(os.path.join(staging, "tmp"), folder, None, MS_BIND)
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # a container that masks parts of /proc forbids a new one: hide the host's behind an empty tmpfs
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555")
    set_read_only("/", True, recursive=True)
    for folder in PRIVATE_FOLDERS:
        if os.path.isdir(folder):
            set_read_only(folder, False)
    return moved


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def set_read_only(path, read_only, recursive=False):
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY) if read_only else MountAttr(attr_clr=MOUNT_ATTR_RDONLY)
    syscall(442, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0, ctypes.byref(attr),
            ctypes.sizeof(attr), what=f"mount_setattr {path}")  # 442 on every architecture (Linux 5.12+)


# ---------------------------------------------------------------------------------------------------------------
# Privileges

def mapped_ids(path):
    """(first, end) ranges of ids that exist in this user namespace, from /proc/self/uid_map or gid_map."""
    with open(path) as f:
        return [(int(inside), int(inside) + int(count)) for inside, _, count in map(str.split, f)]


def pick_sandbox_uid():
    """
    A uid (also used as gid) for one run as root: random, above the ids distributions hand out, among those this
    user namespace maps, so parallel runs get different ones and none owns a file or a process.
    """
    ranges = [(max(a, c), min(b, d)) for a, b in mapped_ids("/proc/self/uid_map")
              for c, d in mapped_ids("/proc/self/gid_map")]
    for floor in (1 << 20, 10000):
        choices = [(max(first, floor), min(end, 1 << 31)) for first, end in ranges if min(end, 1 << 31) > floor + 2]
        if choices:
            first, end = max(choices, key=lambda r: r[1] - r[0])
            uid = first + int.from_bytes(os.urandom(4), "little") % (end - first)
            if uid not in (NOBODY, NOBODY + 1):
                return uid
    raise OSError("no unprivileged uid is mapped in this user namespace")


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def drop_privileges(uid):
    """Root becomes uid (no groups, no capabilities); anyone else drops every capability it holds (in a user namespace)."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from uid 0 to others: the kernel clears every capability set
    else:
        header = CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        check(LIBC.capset(ctypes.byref(header), (ctypes.c_uint32 * 6)()), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries gain nothing; required by Landlock and seccomp


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


# ---------------------------------------------------------------------------------------------------------------
# Landlock: https://docs.kernel.org/userspace-api/landlock.html

# access rights (LANDLOCK_ACCESS_FS_*): the first 13 exist since ABI 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
READ = EXECUTE | READ_FILE | READ_DIR
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the only ones a rule on a file may hold


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    """The kernel's Landlock ABI version; 0 where it has none (or a container's seccomp profile refuses it)."""
    try:
        return syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError:
        return 0


def landlock_ruleset(readable, writable):
    """
    A ruleset (its fd) that allows reading below the folders in readable, everything below those in writable and
    nothing else on the filesystem; with ABI 4+ no TCP either, with ABI 6+ no signals or abstract Unix sockets to
    processes outside. It takes effect in landlock_restrict(); build it while the folders can still be opened.
    """
    abi = landlock_abi()
    every_right = ((1 << 13) - 1) | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0) \
        | (IOCTL_DEV if abi >= 5 else 0)
    attr = RulesetAttr(every_right, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # all of TCP; signals, abstract sockets
    ruleset = syscall(444, ctypes.byref(attr), 8 if abi < 4 else 16 if abi < 6 else 24, 0, what="landlock ruleset")
    rules = [(path, READ) for path in readable] + [(path, every_right) for path in writable]
    rules.append(("/dev/null", READ | WRITE_FILE | TRUNCATE))
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            syscall(445, ruleset, 1, ctypes.byref(PathBeneathAttr(rights & every_right, fd)), 0,
                    what=f"landlock rule {path}")  # LANDLOCK_RULE_PATH_BENEATH
        finally:
            os.close(fd)
    return ruleset


def landlock_restrict(ruleset):
    syscall(446, ruleset, 0, what="landlock_restrict_self")
    os.close(ruleset)


# ---------------------------------------------------------------------------------------------------------------
# seccomp: a classic BPF program over (syscall number, arguments)

ARCHITECTURES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # AUDIT_ARCH_*, column in SYSCALLS
SYSCALLS = {  # name: (x86_64, aarch64)
    "socket": (41, 198), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "clone": (56, 220),
    "clone3": (435, 435), "fcntl": (72, 25), "ioctl": (16, 29),
    # signals and other processes' memory
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "pidfd_send_signal": (424, 424),
    "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "process_madvise": (440, 440), "kcmp": (312, 272),
    # kernel interfaces a program has no use for (io_uring could open sockets behind seccomp's back)
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "add_key": (248, 217), "request_key": (249, 218),
    "keyctl": (250, 219),
    # namespaces and mounts
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    # metadata that Landlock does not guard (it guards opening, creating, removing, renaming)
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452), "chown": (92, None),
    "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54), "truncate": (76, 45), "utime": (132, None),
    "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88), "setxattr": (188, 5),
    "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14), "lremovexattr": (198, 15),
    "fremovexattr": (199, 16), "setxattrat": (463, 463), "removexattrat": (466, 466),
    # System V IPC and POSIX message queues: shared with the host outside an IPC namespace
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197), "semget": (64, 190),
    "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192), "msgget": (68, 186), "msgsnd": (69, 189),
    "msgrcv": (70, 188), "msgctl": (71, 187), "mq_open": (240, 180), "mq_unlink": (241, 181),
    "mq_timedsend": (242, 182), "mq_timedreceive": (243, 183), "mq_notify": (244, 184), "mq_getsetattr": (245, 185),
}
ALWAYS_REFUSED = [name for name in SYSCALLS if name not in ("kill", "tkill", "tgkill", "clone", "clone3", "fcntl",
                                                            "ioctl")]
F_SETOWN, F_SETOWN_EX = 8, 15  # would make the kernel signal any process on I/O
FIOSETOWN, SIOCSPGRP, TIOCSTI = 0x8901, 0x8902, 0x5412
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def seccomp_supported():
    return os.uname().machine in ARCHITECTURES


def argument_rule(number, argument, tests, on_match, otherwise):
    """BPF for: if the syscall is number, return on_match when any (jump op, constant) test holds for the low 32 bits
    of argument (all the kernel reads of an int or a pid), else otherwise."""
    block = [(BPF_LD_W_ABS, 0, 0, 16 + 8 * argument)]  # seccomp_data.args[argument]
    block += [(op, len(tests) - i, 0, k) for i, (op, k) in enumerate(tests)]
    block += [(BPF_RET, 0, 0, otherwise), (BPF_RET, 0, 0, on_match)]
    return [(BPF_JEQ, 0, len(block), number)] + block


def install_seccomp(own_pid):
    """Refuse (EPERM) what SYSCALLS lists; signals only to own_pid (or its own process group); clone3 answers ENOSYS
    (its flags are out of a filter's reach) so that libc falls back to clone, whose namespace flags are refused."""
    arch, column = ARCHITECTURES[os.uname().machine]
    number = {name: numbers[column] for name, numbers in SYSCALLS.items() if numbers[column] is not None}
    deny, allow = RET_ERRNO | EPERM, RET_ALLOW
    program = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ, 1, 0, arch), (BPF_RET, 0, 0, RET_KILL_PROCESS),
               (BPF_LD_W_ABS, 0, 0, 0),  # the syscall number, in the accumulator for every test below
               (BPF_JGE, 0, 1, 0x40000000), (BPF_RET, 0, 0, RET_ERRNO | ENOSYS)]  # x32 numbers on x86_64
    for name in ALWAYS_REFUSED:
        if name in number:
            program += [(BPF_JEQ, 0, 1, number[name]), (BPF_RET, 0, 0, deny)]
    program += [(BPF_JEQ, 0, 1, number["clone3"]), (BPF_RET, 0, 0, RET_ERRNO | ENOSYS)]
    program += argument_rule(number["kill"], 0, [(BPF_JEQ, 0), (BPF_JEQ, own_pid)], allow, deny)
    program += argument_rule(number["tkill"], 0, [(BPF_JEQ, own_pid)], allow, deny)
    program += argument_rule(number["tgkill"], 0, [(BPF_JEQ, own_pid)], allow, deny)
    program += argument_rule(number["clone"], 0, [(BPF_JSET, CLONE_NEW_ANY)], deny, allow)
    program += argument_rule(number["fcntl"], 1, [(BPF_JEQ, F_SETOWN), (BPF_JEQ, F_SETOWN_EX)], deny, allow)
    program += argument_rule(number["ioctl"], 1, [(BPF_JEQ, c) for c in (FIOSETOWN, SIOCSPGRP, TIOCSTI)], deny, allow)
    program.append((BPF_RET, 0, 0, allow))
    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    fprog = SockFprog(len(program), filters)
    check(LIBC.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp")  # SECCOMP_MODE_FILTER


# ---------------------------------------------------------------------------------------------------------------
# Processes and files

def become_subreaper():
    """Orphaned descendants are re-parented to this process instead of init, so kill_descendants() finds them all."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_DUMPABLE, 0)  # and processes of the same user may not ptrace it or read its memory


def die_with_parent():
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def children():
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look for our pid as the parent in every /proc/N/stat
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == me:
                        found.append(int(pid))
            except (OSError, ValueError, IndexError):
                pass
        return found


def kill_descendants():
    """SIGKILL every descendant and reap it. As a subreaper we get back every orphan before its parent can be reaped,
    so once no child is left, no descendant is either (a PID namespace's init is reaped after its whole namespace)."""
    while True:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def folder_usage(path):
    """(bytes on disk, number of entries) below path, symlinks not followed."""
    total = entries = 0
    for root, folders, files in os.walk(path):
        for name in folders + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
                entries += 1
            except OSError:
                pass
    return total, entries
