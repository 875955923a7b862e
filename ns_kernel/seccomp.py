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


def SCMP_ACT_ERRNO(code):  # noqa: N802 - libseccomp's name
    return 0x00050000 | (code & 0xFFFF)


class SeccompError(OSError):
    pass


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
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def available():
    """None if a filter can be loaded here, else why not (for the doctor and the error)."""
    return None if _library() else "libseccomp.so.2 not found (Debian: apt install libseccomp2)"


NAMESPACES = ("unshare", "setns")


def load(allow_userns=False):
    """Deny DENIED with EPERM for this process and every child it makes from now on
    (unshare and setns too, unless allow_userns). Needs no_new_privs (seal.py)."""
    denied = [n for n in DENIED if not (allow_userns and n in NAMESPACES)]
    lib = _library()
    if lib is None:
        raise SeccompError(errno.ENOSYS, available())
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompError(errno.ENOMEM, "seccomp_init")
    try:
        for name in denied:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue    # not a syscall on this architecture
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ERRNO(errno.EPERM), nr, 0)
            if rc < 0:
                raise SeccompError(-rc, f"seccomp_rule_add({name})")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(-rc, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
