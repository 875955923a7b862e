"""The raw Linux calls the sandbox needs, through ctypes, with flags named as in the man pages.

Nothing here decides policy: each function does one syscall and raises OSError with the
errno, so the caller can turn it into a SetupError naming its step.
"""
import ctypes
import enum
import os

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers past 424 are the same on every architecture (the unified table).
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446


class CloneFlags(enum.IntFlag):
    CLONE_NEWNS = 0x00020000
    CLONE_NEWCGROUP = 0x02000000
    CLONE_NEWUTS = 0x04000000
    CLONE_NEWIPC = 0x08000000
    CLONE_NEWUSER = 0x10000000
    CLONE_NEWPID = 0x20000000
    CLONE_NEWNET = 0x40000000


class MountFlags(enum.IntFlag):
    MS_RDONLY = 1
    MS_NOSUID = 2
    MS_NODEV = 4
    MS_NOEXEC = 8
    MS_BIND = 4096
    MS_REC = 16384
    MS_PRIVATE = 1 << 18


class MountAttr(enum.IntFlag):
    """mount_setattr(2) attributes: applied to a whole bind tree at once (AT_RECURSIVE)."""
    MOUNT_ATTR_RDONLY = 0x1
    MOUNT_ATTR_NOSUID = 0x2
    MOUNT_ATTR_NODEV = 0x4
    MOUNT_ATTR_NOEXEC = 0x8
    MOUNT_ATTR_IDMAP = 0x100000   # with a user namespace's fd: whose ids the files show


def flag_names(flags):
    """'MS_BIND|MS_REC' rather than 0x5000, for error messages."""
    return "|".join(f.name for f in type(flags) if f in flags) or "0"


MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PRCTL_NAMES = {PR_SET_PDEATHSIG: "PR_SET_PDEATHSIG", PR_SET_DUMPABLE: "PR_SET_DUMPABLE",
               PR_SET_NAME: "PR_SET_NAME", PR_CAPBSET_DROP: "PR_CAPBSET_DROP",
               PR_SET_NO_NEW_PRIVS: "PR_SET_NO_NEW_PRIVS", PR_SET_SECCOMP: "PR_SET_SECCOMP",
               PR_CAP_AMBIENT: "PR_CAP_AMBIENT"}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class SyscallError(OSError):
    """An OSError that knows which call failed (`call`), for the one-line error."""

    def __init__(self, err, call, path=None):
        super().__init__(err, os.strerror(err), path)
        self.call = call


def _check(result, call, path=None):
    if result == -1:
        raise SyscallError(ctypes.get_errno(), call, path)
    return result


def chdir(path):
    try:
        os.chdir(path)
    except OSError as exc:
        raise SyscallError(exc.errno, "chdir", path) from None


def drop_supplementary_groups():
    try:
        os.setgroups([])
    except OSError as exc:
        raise SyscallError(exc.errno, "setgroups([])") from None


def unshare(flags):
    _check(_libc.unshare(ctypes.c_int(int(flags))), f"unshare({flag_names(flags)})")


def setns(fd, flags):
    """Join the namespaces `flags` of the process that pidfd `fd` refers to, all at once."""
    _check(_libc.setns(fd, ctypes.c_int(int(flags))), f"setns({flag_names(flags)})")


IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def inotify_watch(path, mask):
    """A non-blocking inotify fd watching `path` for `mask` events."""
    fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
    try:
        _check(_libc.inotify_add_watch(fd, path.encode(), ctypes.c_uint32(mask)), "inotify_add_watch", path)
    except OSError:
        os.close(fd)
        raise
    return fd


def mount(source, target, fstype, flags=0, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(int(flags)), enc(data)),
           f"mount({fstype}, {flag_names(flags)})", target)


def umount2(target, flags=0):
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root, put_old):
    _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()), "pivot_root",
           new_root)


def open_tree_clone(handle, path):
    """A detached copy of the mount tree at `handle` (an O_PATH fd, for `path`), as an fd:
    a bind mount not yet placed."""
    return _check(_libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(handle), b"",
                                ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
                                              | AT_EMPTY_PATH)),
                  "open_tree", path)


def move_mount(fd, target, to_fd):
    """Attach the detached mount `fd` on the dir or file `to_fd` (an O_PATH fd, for the path
    `target`): no name is looked up."""
    _check(_libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"",
                         ctypes.c_int(to_fd), b"",
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
           "move_mount", target)


class _MountAttrStruct(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path, attr_set, recursive=True, fd=None, userns_fd=0):
    """On the mount at path, or (fd: an fd of its root; path then only names it) at fd;
    userns_fd: the user namespace whose id maps MOUNT_ATTR_IDMAP applies."""
    attr = _MountAttrStruct(int(attr_set), 0, 0, userns_fd)
    flags = (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if fd is not None else 0)
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR),
                         ctypes.c_int(AT_FDCWD if fd is None else fd),
                         b"" if fd is not None else path.encode(), ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr", path)


def sethostname(name):
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", name)


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    return _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)),
                  f"prctl({PRCTL_NAMES.get(option, option)})")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp_program(program):
    """Load a classic BPF seccomp program (8 bytes per instruction) for the calling thread,
    with no flags, as libseccomp's seccomp_load does by default. Needs no_new_privs."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring():
    """keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): a fresh anonymous session keyring."""
    _check(_libc.syscall(ctypes.c_long(SYS_KEYCTL), ctypes.c_int(KEYCTL_JOIN_SESSION_KEYRING),
                         ctypes.c_char_p(None)), "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")


def set_parent_death_signal(sig):
    prctl(PR_SET_PDEATHSIG, int(sig))


def set_no_new_privs():
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_dumpable(dumpable=True):
    prctl(PR_SET_DUMPABLE, int(dumpable))


def set_process_title(title, name=None):
    """What /proc/PID/cmdline (and ps) show from now on: `title`, written over the argv
    the process was exec'd with, which is the memory the kernel reads it from (the way
    setproctitle(3) does it; PR_SET_MM would need CAP_SYS_RESOURCE on the host), cut to
    fit there. A last byte other than NUL tells the kernel to stop at the title's NUL. The
    short name (/proc/PID/comm, 15 bytes) follows, unless `name` says another."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])     # arg_start, arg_end: proc(5) 48, 49
    raw = title.encode()[:end - start - 2] + b"\0"
    ctypes.memmove(start, raw + b" " * (end - start - len(raw)), end - start)
    short = ctypes.create_string_buffer((name or title).encode()[:15])
    prctl(PR_SET_NAME, ctypes.addressof(short))


LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1
LANDLOCK_RULE_PATH_BENEATH = 1


class LandlockFs(enum.IntFlag):
    """The filesystem rights Landlock can take away (landlock.h), those ns_kernel uses."""
    LANDLOCK_ACCESS_FS_MAKE_CHAR = 1 << 6
    LANDLOCK_ACCESS_FS_MAKE_FIFO = 1 << 10
    LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
    LANDLOCK_ACCESS_FS_MAKE_SYM = 1 << 12
    LANDLOCK_ACCESS_FS_REFER = 1 << 13      # ABI 2


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1      # __attribute__((packed)) in landlock.h: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    """The Landlock ABI version this Linux offers, 0 if none."""
    version = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.c_void_p(None),
                            ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(version, 0)


def landlock_restrict(handled_fs=LandlockFs(0), rules=(), scoped=0):
    """From now on this thread and its children lose the `handled_fs` rights but where
    `rules` ((dir, rights), ...) grant them, beneath a dir, and whatever `scoped` names
    (ABI 6: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: abstract unix sockets made outside the
    domain). Needs no_new_privs."""
    attr = _LandlockRulesetAttr(handled_fs, 0, scoped)
    fd = _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                              ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
                f"landlock_create_ruleset({flag_names(handled_fs)})")
    try:
        for path, rights in rules:
            beneath = _LandlockPathBeneathAttr(
                rights, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            try:
                _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                                     ctypes.byref(beneath), ctypes.c_uint32(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(beneath.parent_fd)
        _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                             ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(fd)


def last_capability():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_all_capabilities():
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    for cap in range(last_capability() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data)),
           "capset")
