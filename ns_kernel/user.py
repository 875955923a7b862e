"""The user namespace: who the sandbox is, seen from inside and from the host."""
import errno
import os

from .errors import SetupError

HINT_SYSCTLS = (
    ("/proc/sys/kernel/unprivileged_userns_clone", "0",
     "unprivileged user namespaces are disabled: sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "AppArmor restricts unprivileged user namespaces: sysctl -w "
     "kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile allowing userns "
     "for this python"),
    ("/proc/sys/user/max_user_namespaces", "0",
     "user namespaces are disabled: sysctl -w user.max_user_namespaces=15000"),
)


def read_sysctl(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_hint(read=read_sysctl):
    """Why unshare(CLONE_NEWUSER) fails on this host, from the sysctls that govern it."""
    from . import container
    for path, bad, hint in HINT_SYSCTLS:
        if read(path) == bad:
            return hint
    if container.seccomp_filtered():
        return container.seccomp_denies(["unshare"])
    return ("user namespaces are not allowed here (a seccomp filter, e.g. Docker's default "
            "profile, or a Kubernetes pod without hostUsers: false); run `ns-kernel doctor`")


def owner_hint(err, owner):
    """Why host root could not give a dir to its sandbox's uid and gid (chown `owner`; a
    uid of -1: the gid alone) because of its id map, and the fix. (Without CAP_CHOWN:
    trial.explain says so, as for every capability root's kernels need.)"""
    from . import container
    if err != errno.EINVAL:
        return ""
    return (container.unmapped_fix(owner[1], "gid") if owner[0] == -1 else
            container.unmapped_fix(owner[0]))


def write_id_maps(pid, plan):
    """Map the plan's one uid and gid for process `pid` (which has just unshared its user
    namespace). Written from the parent namespace: only there may host root map another uid.
    os.write, not file.write: the latter hides EPERM behind buffering."""
    _write_maps(pid, plan.uid_map.line(), plan.gid_map.line())


def _write_maps(pid, uid_line, gid_line):
    root = f"/proc/{pid}"
    steps = [(f"{root}/uid_map", uid_line)]
    if os.getuid() != 0:
        # An unprivileged writer may map its gid only after giving up setgroups(2) for good.
        steps.append((f"{root}/setgroups", "deny"))
    steps.append((f"{root}/gid_map", gid_line))
    for path, text in steps:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise SetupError("user", f"write {text.strip()!r} to", path, exc.errno) from None


def idmap_namespace(owner, kernel):
    """An fd of a user namespace that maps the host ids `owner` (uid, gid) to `kernel`'s,
    one each: what MOUNT_ATTR_IDMAP takes to show the owner's files as the kernel's through
    one mount (mount.open_sources), and to write the kernel's files as the owner's. Host
    root makes it (only root may map ids that are not its own): a child unshares and waits
    while its maps are written; the fd keeps the namespace once the child has gone."""
    import signal
    from .pid import FORWARDED
    from .syscalls import CloneFlags, unshare
    up_r, up_w = os.pipe2(os.O_CLOEXEC)
    down_r, down_w = os.pipe2(os.O_CLOEXEC)
    # The child runs none of the launcher's signal handlers.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    child = os.fork()
    if child == 0:
        try:
            os.close(down_w)
            unshare(CloneFlags.CLONE_NEWUSER)
            os.write(up_w, b"U")
            os.read(down_r, 1)      # until the parent closes its end
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(up_w)
    os.close(down_r)
    try:
        if os.read(up_r, 1) != b"U":
            raise SetupError("user", "unshare(CLONE_NEWUSER) for the folder's id map", "",
                             hint=userns_hint())
        _write_maps(child, f"{owner[0]} {kernel[0]} 1\n", f"{owner[1]} {kernel[1]} 1\n")
        path = f"/proc/{child}/ns/user"
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SetupError("user", "open", path, exc.errno) from None
    finally:
        os.close(up_r)
        os.close(down_w)
        os.waitpid(child, 0)


# What a kernel could otherwise make: namespaces of every kind (a nested user namespace
# reopens most of the host kernel's attack surface, and let one kernel mount a devpts of
# its own and take every pty of the host).
NAMESPACE_LIMITS = tuple(f"max_{kind}_namespaces" for kind in (
    "user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"))
# What every kernel of one uid draws from the same host-wide count (the owner of the
# sandbox's user namespace is charged too: root, for root's kernels): (name here, the
# host's setting, the least a notebook needs).
INOTIFY_BUDGETS = (("max_inotify_instances", "/proc/sys/fs/inotify/max_user_instances", 8),
                   ("max_inotify_watches", "/proc/sys/fs/inotify/max_user_watches", 8192))


def set_namespace_limits(allow_userns):
    """In init, with its capabilities over the sandbox's user namespace: its per-namespace
    limits (user.* sysctls) say no new namespace may be made in it (unless allow_userns),
    and cap its share of the uid's inotify budgets (limits.share); nested namespaces stay
    under these caps."""
    from .limits import share
    settings = [] if allow_userns else [(n, 0) for n in NAMESPACE_LIMITS]
    for name, host, least in INOTIFY_BUDGETS:
        with open(host) as f:       # fs.inotify.* are the host's values, read in any ns
            settings.append((name, share(int(f.read()), least)))
    for name, value in settings:
        path = f"/proc/sys/user/{name}"
        if not os.path.exists(path):
            continue     # a namespace kind this kernel does not have
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise SetupError("user", f"write {value} to", path, exc.errno,
                             "or let the kernel make namespaces: --allow-userns") from None
