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
    root = f"/proc/{pid}"
    steps = [(f"{root}/uid_map", plan.uid_map.line())]
    if os.getuid() != 0:
        # An unprivileged writer may map its gid only after giving up setgroups(2) for good.
        steps.append((f"{root}/setgroups", "deny"))
    steps.append((f"{root}/gid_map", plan.gid_map.line()))
    for path, text in steps:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise SetupError("user", f"write {text.strip()!r} to", path, exc.errno) from None


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
