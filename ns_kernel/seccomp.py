"""The seccomp filter: the last wall, loaded just before the kernel runs (seal.py).

Namespaces leave the whole syscall surface of the host's Linux kernel reachable; what a
notebook never needs answers EPERM instead: the syscalls Docker's default profile denies
to an unprivileged container (keyrings, bpf, perf, userfaultfd, io_uring, kexec, module
loading, open_by_handle_at, clock and swap changes, the mount API, namespaces), so that a
bug in one of them is not reachable from a kernel. numpy, pandas, matplotlib, threads,
subprocess, multiprocessing, ptys, debugpy and pip use none of them.

Through libseccomp (the system's libseccomp.so.2, as bubblewrap's and systemd's users
have it), by ctypes: it knows every architecture's syscall numbers and the x32 and
32-bit compat ABIs, which a hand-written BPF program would have to get right itself.
"""
import ctypes
import errno
import functools
import os
from dataclasses import dataclass, replace

from .errors import SetupError

# Denied by default (EPERM). Names unknown to this architecture are skipped.
DENIED = (
    # keyrings: the server's session keyring must stay out of reach (seal.py joins a new one)
    "add_key", "keyctl", "request_key",
    # kernel attack surface a notebook never needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "fanotify_init", "quotactl", "quotactl_fd", "nfsservctl", "uselib", "ustat", "sysfs",
    "_sysctl", "vm86", "vm86old", "iopl", "ioperm", "kcmp", "process_vm_readv",
    "process_vm_writev", "pidfd_getfd",
    # the host's clock, swap, accounting, power
    "settimeofday", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
    "adjtimex", "stime", "swapon", "swapoff", "acct", "reboot", "syslog",
    # mounts and namespaces: the sandbox is built; nothing in it may rebuild it
    "mount", "umount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2     # libseccomp's enum scmp_filter_attr


def SCMP_ACT_ERRNO(code):  # noqa: N802 - libseccomp's name
    return 0x00050000 | (code & 0xFFFF)


# A syscall of an ABI the filter was not built for: x32 numbers (0x40000000 | nr) and
# i386's int 0x80 on x86_64, compat ABIs elsewhere. Its rules name the native numbers
# only, so such a call must not pass; libseccomp's default answer (SCMP_ACT_KILL) kills
# only the calling thread, which leaves an ipykernel whose heartbeat thread answers and
# whose shell never will again. ENOSYS is what a Linux built without x32 answers (most
# distributions' default): the call fails, the kernel lives, nothing reaches the rules'
# blind side.
BAD_ARCH = SCMP_ACT_ERRNO(errno.ENOSYS)


# The actions a Docker/OCI profile may name. SCMP_ACT_TRACE and SCMP_ACT_NOTIFY need a
# tracer or a listener, which a kernel does not have: refused, not silently changed.
# SCMP_ACT_KILL and SCMP_ACT_KILL_THREAD kill the whole process here: a killed thread
# leaves an ipykernel whose heartbeat answers and whose shell never does (a cell's thread
# waits forever on it, a killed main thread takes the shell with it); the whole kernel
# ending with SIGSYS is what the user and the server log can see (limits.death_reason).
ACTIONS = {"SCMP_ACT_ALLOW": lambda code: SCMP_ACT_ALLOW,
           "SCMP_ACT_ERRNO": SCMP_ACT_ERRNO,
           "SCMP_ACT_KILL": lambda code: 0x80000000,
           "SCMP_ACT_KILL_THREAD": lambda code: 0x80000000,
           "SCMP_ACT_KILL_PROCESS": lambda code: 0x80000000,
           "SCMP_ACT_TRAP": lambda code: 0x00030000,
           "SCMP_ACT_LOG": lambda code: 0x7FFC0000}
COMPARE = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
           "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
# Docker's names for this machine's architecture (a rule's includes/excludes "arches").
DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "x86", "armv7l": "arm",
               "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class SeccompError(OSError):
    pass


@dataclass(frozen=True)
class Rule:
    names: tuple
    action: int
    args: tuple = ()     # ((index, op, datum_a, datum_b), ...): all must hold


@dataclass(frozen=True)
class Filter:
    """What libseccomp compiles (program): plain data, so a plan can carry it."""
    default: int
    rules: tuple
    arches: tuple = ()   # libseccomp names ("x86", "x32") besides this machine's own
    source: str = ""     # the profile file it came from, '' for the default filter


# Where Linux has no Landlock to keep links and FIFOs out of the folders the host reads
# (seal.LINKS): denied everywhere instead (mknod makes FIFOs; devices need a capability).
LINKS = ("symlink", "symlinkat", "mknod", "mknodat")


# The setuid and setgid bits, and where each call that gives a file its mode takes it (the
# argument's index). Inert inside (no_new_privs), they are not on the host: a file of the
# folder that root's kernel sees through an id map (plan.folder_idmap) is root's there, so
# a setuid one would run as root for whoever can reach it. No notebook needs them.
SETID_BITS = (0o4000, 0o2000)
MODE_ARGUMENT = {1: ("chmod", "fchmod", "creat", "mknod"),
                 2: ("fchmodat", "fchmodat2", "open", "mknodat"), 3: ("openat",)}
# Takes its mode in a struct no filter can read: ENOSYS, as a Linux before 5.6 answers;
# libc and Python open files with openat.
UNREADABLE_MODE = ("openat2",)


def default_filter(allow_userns=False, no_links=False):
    """Allow all but DENIED, which answers EPERM (unshare and setns too, unless
    allow_userns; symlinks too, with no_links), and setuid or setgid modes (SETID_BITS)."""
    denied = tuple(n for n in DENIED if not (allow_userns and n in NAMESPACES))
    denied += LINKS if no_links else ()
    setid = [Rule(tuple(n for n in names if n not in denied), SCMP_ACT_ERRNO(errno.EPERM),
                  ((index, COMPARE["SCMP_CMP_MASKED_EQ"], bit, bit),))
             for index, names in MODE_ARGUMENT.items() for bit in SETID_BITS]
    return Filter(SCMP_ACT_ALLOW, (Rule(denied, SCMP_ACT_ERRNO(errno.EPERM)), *setid,
                                   Rule(UNREADABLE_MODE, SCMP_ACT_ERRNO(errno.ENOSYS))))


def is_profile(setting):
    return setting not in ("default", "off")


def read_profile(path):
    """A Docker/OCI seccomp profile (JSON) as a Filter. Read once, here, on the host: the
    admin's file, so it must be nobody else's to change (build_plan also refuses one the
    kernel may write)."""
    import json
    import stat
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError("seccomp", "open seccomp profile", path, exc.errno) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SetupError("seccomp", "seccomp profile", path, hint="not a regular file")
        if info.st_uid not in (0, os.getuid()) or info.st_mode & 0o022:
            raise SetupError("seccomp", "seccomp profile", path, hint=(
                "another user may change it: make it yours or root's, and not group- or "
                "world-writable"))
        data = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
    finally:
        os.close(fd)
    try:
        profile = json.loads(data)
    except ValueError as exc:
        raise SetupError("seccomp", "seccomp profile", path, hint=f"not JSON: {exc}") from None
    return replace(from_profile(profile, path), source=real)


def from_profile(profile, path="profile"):
    """A Filter from a profile's dict, as runc reads one for a container without
    capabilities: rules that need a capability are left out, since a kernel has none."""
    def fail(why):
        raise SetupError("seccomp", "seccomp profile", path, hint=why)

    def action(name, code):
        if name not in ACTIONS:
            fail(f"action {name} needs a tracer or listener, and none runs beside a kernel"
                 if name in ("SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY") else f"unknown action {name}")
        return ACTIONS[name](errno.EPERM if code is None else code)

    if not isinstance(profile, dict) or "defaultAction" not in profile:
        fail("no defaultAction (is it a Docker/OCI seccomp profile?)")
    default = action(profile["defaultAction"], profile.get("defaultErrnoRet"))
    machine = os.uname().machine
    arches = [a for entry in profile.get("archMap") or ()
              if _arch(entry.get("architecture", "")) == machine
              for a in entry.get("subArchitectures") or ()] + list(profile.get("architectures") or ())
    rules = []
    for rule in profile.get("syscalls") or ():
        if not _applies(rule, machine):
            continue
        act = action(rule.get("action", ""), rule.get("errnoRet"))
        if act == default:
            continue    # libseccomp refuses a rule that repeats the default
        args = []
        for arg in rule.get("args") or ():
            if arg.get("op") not in COMPARE:
                fail(f"unknown comparison {arg.get('op')}")
            args.append((int(arg["index"]), COMPARE[arg["op"]], int(arg.get("value", 0)),
                         int(arg.get("valueTwo", 0))))
        names = tuple(rule.get("names") or ([rule["name"]] if rule.get("name") else []))
        # As runc: conditions on one argument each are ANDed in one rule; two on the same
        # argument cannot both hold, so each becomes a rule of its own (ORed).
        indexes = [a[0] for a in args]
        if len(set(indexes)) == len(indexes):
            rules.append(Rule(names, act, tuple(args)))
        else:
            rules += [Rule(names, act, (a,)) for a in args]
    # This machine's own architecture is in every filter already (uname's name is
    # libseccomp's).
    others = (name for name in map(_arch, arches) if name != machine)
    return Filter(default, tuple(rules), tuple(dict.fromkeys(others)))


def _arch(name):
    """SCMP_ARCH_X86_64 -> x86_64: libseccomp's name, and uname's for this machine."""
    return name.removeprefix("SCMP_ARCH_").lower()


def _applies(rule, machine):
    """A rule's includes and excludes, read as Docker does, for this machine and a process
    without capabilities (so "caps" in includes drops a rule, in excludes keeps it)."""
    arch = DOCKER_ARCH.get(machine)
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if arch in (excludes.get("arches") or ()):
        return False
    if excludes.get("minKernel") and _kernel() >= _version(excludes["minKernel"]):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if includes.get("minKernel") and _kernel() < _version(includes["minKernel"]):
        return False
    return not includes.get("caps")


def _version(text):
    return tuple(int(part) for part in text.split("-")[0].split(".")[:2])


def _kernel():
    return _version(os.uname().release)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library():
    # By its soname: ctypes.util.find_library runs ldconfig, a fork the sealed process
    # must not make (the prestarted kernel's pid is planned: prestart.py).
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def available():
    """None if a filter can be loaded here, else why not (for the doctor and the error)."""
    return None if _library() else "libseccomp.so.2 not found (Debian: apt install libseccomp2)"


NAMESPACES = ("unshare", "setns")


# Linux's limit on a program's instructions (BPF_MAXINSNS); libseccomp 2.5 counts them in
# 16 bits and would wrap a bigger one rather than refuse it.
MAX_INSTRUCTIONS = 4096
MFD_NOEXEC_SEAL = 0x0008


def load(filter_):
    """Load filter_ for the calling thread (the sandbox's processes have one when it is
    loaded) and every child it makes from now on. Needs no_new_privs (seal.py)."""
    from .syscalls import SyscallError, load_seccomp_program
    try:
        load_seccomp_program(program(filter_))
    except SyscallError as exc:
        raise SeccompError(exc.errno, "prctl(PR_SET_SECCOMP)") from None


@functools.lru_cache(maxsize=4)
def program(filter_):
    """filter_ as libseccomp compiles it for this machine: the classic BPF program seccomp
    loads (8 bytes per instruction). Cached: the warm template compiles the default filter
    once for all its kernels (~4 ms of each one's start, in a fork that copies each page
    libseccomp and ctypes touch)."""
    lib = _library()
    if lib is None:
        raise SeccompError(errno.ENOSYS, available())
    ctx = lib.seccomp_init(filter_.default)
    if not ctx:
        raise SeccompError(errno.ENOMEM, "seccomp_init")
    try:
        rc = lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, BAD_ARCH)
        if rc < 0:
            raise SeccompError(-rc, "seccomp_attr_set(SCMP_FLTATR_ACT_BADARCH)")
        for arch in filter_.arches:
            token = lib.seccomp_arch_resolve_name(arch.encode())
            rc = lib.seccomp_arch_add(ctx, token) if token else -errno.EINVAL
            if rc < 0 and rc != -errno.EEXIST:
                raise SeccompError(-rc, f"seccomp_arch_add({arch})")
        for rule in filter_.rules:
            args = (_ArgCmp * max(len(rule.args), 1))(*(_ArgCmp(*a) for a in rule.args))
            for name in rule.names:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:
                    continue    # not a syscall on this architecture
                rc = lib.seccomp_rule_add_array(ctx, rule.action, nr, len(rule.args), args)
                if rc < 0:
                    raise SeccompError(-rc, f"seccomp_rule_add({name})")
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib, ctx):
    """The program, through a memfd (sealed against exec where Linux can: with
    vm.memfd_noexec=2 an unsealed one is refused), checked for its size."""
    try:
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:      # Linux before 6.3 knows no MFD_NOEXEC_SEAL
            raise SeccompError(exc.errno, "memfd_create") from None
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SeccompError(-rc, "seccomp_export_bpf")
        size = os.fstat(fd).st_size
        code = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(code) != size or not code or size % 8 or size // 8 > MAX_INSTRUCTIONS:
        raise SeccompError(errno.E2BIG, f"seccomp_export_bpf: a program of {size} bytes "
                           f"(at most {MAX_INSTRUCTIONS} instructions of 8)")
    return code
