"""What a container does to a sandbox's start, found by trying: the sandbox's own syscalls
and a fresh proc and sysfs, made in throwaway namespaces (trial), as `ns-kernel doctor`
does before it starts kernels; and the fix for a start that failed on one of them
(explain: what the launcher's one line says), in the words of container.py.
"""
import json
import os

from . import container
from .mount import FILESYSTEMS
from .plan import Op
from .syscalls import CloneFlags, MountAttr, MountFlags, move_mount, mount, mount_setattr, \
    open_tree_clone, pivot_root, sethostname, setns, umount2, unshare

# The steps of a start (SetupError.step) that a container's setting can make fail, and
# which one: root's capabilities for the dirs and files it gives to its kernels' uid and
# for their ids (its id maps, setgroups: "sandbox", a child's step without a name of its
# own); the seccomp filter for the sandbox's syscalls. (A refused proc or sysfs says so
# where it is mounted: mount.py.)
ROOT_STEPS = ("socket dir", "state dir", "connection", "user", "sandbox")
SANDBOX_STEPS = ("user", "pid", "unshare", "uts", "mount", "sandbox", "prestart")


def explain(error):
    """A failed start's SetupError, with the container setting that avoids it as its hint
    (in the doctor's words), unless it has one: root's missing capabilities, or the sandbox
    syscalls this process's seccomp filter denies (a trial, as the doctor's: on a failure
    only)."""
    if error.hint or error.errno not in container.DENIED:
        return error
    hint = ""
    missing = container.missing_root_capabilities()
    if missing and error.step in ROOT_STEPS:
        hint = container.root_lacks(missing)
    elif error.step in SANDBOX_STEPS and container.seccomp_filtered():
        names = container.denied(trial())
        hint = container.seccomp_denies(names) if names else ""
    if not hint:
        return error
    return type(error)(error.step, error.syscall, error.path, error.errno, hint)


def trial():
    """Make each syscall the sandbox needs, and a fresh proc and sysfs mount, in throwaway
    namespaces; {name: errno (0: it worked)}. With harmless arguments: a call the filter
    lets through fails on them (ENOENT, EBADF) or changes only the throwaway namespaces."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        seen = {}
        try:
            _trial_in_child(seen)
        except BaseException:  # noqa: BLE001 - a bug must show, not read as "allowed"
            import traceback
            traceback.print_exc()
        finally:
            os.write(w, json.dumps(seen).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        seen = json.loads(pipe.read() or "{}")
    os.waitpid(child, 0)
    return seen


def _trial_in_child(seen):
    def attempt(name, call, *args):
        try:
            call(*args)
            seen[name] = 0
        except OSError as exc:
            seen[name] = exc.errno
        return not seen[name]

    if not attempt("unshare", unshare, CloneFlags.CLONE_NEWUSER):
        return
    flags = (CloneFlags.CLONE_NEWNS | CloneFlags.CLONE_NEWUTS | CloneFlags.CLONE_NEWPID
             | CloneFlags.CLONE_NEWNET)
    if not attempt("unshare", unshare, flags):
        return
    pid1 = os.fork()     # the new PID namespace's first process: proc needs one
    if pid1:
        os.waitpid(pid1, 0)
        os._exit(0)
    nowhere = "/nonexistent-ns-kernel-doctor"
    private = attempt("mount", mount, None, "/", None, MountFlags.MS_REC | MountFlags.MS_PRIVATE)
    attempt("umount2", umount2, nowhere)
    attempt("pivot_root", pivot_root, nowhere, nowhere)
    attempt("open_tree", open_tree_clone, -1, nowhere)
    attempt("move_mount", move_mount, -1, nowhere, -1)
    attempt("mount_setattr", mount_setattr, nowhere, MountAttr.MOUNT_ATTR_RDONLY)
    attempt("sethostname", sethostname, os.uname().nodename)
    with open("/proc/self/ns/uts") as uts:
        attempt("setns", setns, uts.fileno(), CloneFlags.CLONE_NEWUTS)
    # Stacked on a tmpfs on /tmp, in this private mount namespace (nothing is created),
    # with the flags the sandbox gives them (a runtime's read-only /sys locks that one).
    if private and attempt("tmpfs", mount, "tmpfs", "/tmp", "tmpfs", MountFlags(0)):
        attempt("proc", mount, "proc", "/tmp", "proc", FILESYSTEMS[Op.PROC][1])
        attempt("sysfs", mount, "sysfs", "/tmp", "sysfs",
                FILESYSTEMS[Op.SYSFS][1] | MountFlags.MS_RDONLY)
