"""What a container runtime does to the process that builds sandboxes, and the setting that
undoes each, in the runtime's own words (docs/containers.md): its seccomp profile, its
masked /proc and /sys, the capabilities root keeps, its user namespace's id map.

`ns-kernel doctor` probes them (probe() makes the sandbox's syscalls in a throwaway set of
namespaces); the launcher's hints name the same fixes.
"""
import errno
import json
import os

# The profile to give the container runtime (scripts/container-seccomp made it).
PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "container-seccomp.json")
SECCOMP_FIX = (f"run the container with ns_kernel's seccomp profile {PROFILE}: `docker run "
               "--security-opt seccomp=FILE` (podman alike); Kubernetes: copy it into the "
               "node's /var/lib/kubelet/seccomp/ and set the container's securityContext."
               "seccompProfile: {type: Localhost, localhostProfile: FILE}")


def seccomp_denies(names):
    return f"a seccomp filter (the container's) denies {', '.join(names)}; {SECCOMP_FIX}"


MASKED_FIX = ("`docker run --security-opt systempaths=unconfined`, `podman run --security-opt "
              "unmask=ALL`; Kubernetes: securityContext.procMount: Unmasked (with the pod's "
              "hostUsers: false)")
# Root's kernels run as another uid (nobody): the launcher chowns their dirs and maps it.
ROOT_CAPS = {"CAP_CHOWN": 0, "CAP_SETGID": 6, "CAP_SETUID": 7}
ROOT_CAPS_FIX = ("`docker run --cap-add CHOWN --cap-add SETUID --cap-add SETGID` (Kubernetes: "
                 "securityContext.capabilities.add: [CHOWN, SETUID, SETGID]), or run the "
                 "server as an ordinary user (`--user 1000`, runAsUser: 1000)")
CAP_SYS_PTRACE = 19
# The syscalls the sandbox makes while it builds itself (the profile's additions).
SANDBOX_SYSCALLS = ("unshare", "mount", "umount2", "pivot_root", "open_tree", "move_mount",
                    "mount_setattr", "sethostname", "setns")
# What a seccomp filter answers for a denied call (Docker's and podman's: EPERM).
DENIED = (errno.EPERM, errno.EACCES, errno.ENOSYS)
# Mounts a runtime puts over parts of /proc and /sys to hide them: a fresh proc or sysfs is
# then refused, since it would show what they hide. (cgroup, debugfs, ... sit on empty dirs.)
MASK_TYPES = ("proc", "sysfs", "tmpfs", "devtmpfs")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    return None


def seccomp_filtered():
    """Is this process under a seccomp filter (a container's)?"""
    return _status("Seccomp") == "2"


def has_capability(bit):
    return bool(int(_status("CapEff") or "0", 16) >> bit & 1)


def missing_root_capabilities():
    """What root lacks to run kernels as another uid ([] unless uid 0)."""
    if os.getuid() != 0:
        return []
    return [name for name, bit in ROOT_CAPS.items() if not has_capability(bit)]


def id_map(kind="uid"):
    """This user namespace's map: [(first id inside, first outside, count)]."""
    with open(f"/proc/self/{kind}_map") as f:
        return [tuple(map(int, line.split())) for line in f if line.strip()]


def mapped(ident, kind="uid"):
    return any(first <= ident < first + count for first, _, count in id_map(kind))


def map_text(kind="uid"):
    return ", ".join(f"{first}-{first + count - 1}" for first, _, count in id_map(kind))


def unmapped_fix(uid):
    return (f"uid {uid} has no mapping in this user namespace (uids {map_text()}: a "
            "container's map?): pick a mapped uid (--uid 1000 --gid 1000) or give the container "
            "a map of 65536 ids (podman --userns=auto:size=65536; Kubernetes' hostUsers: false "
            "maps 65536)")


def masked(mountinfo="/proc/self/mountinfo"):
    """Mount points over parts of /proc and /sys (Docker's and podman's masked paths)."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            point, fstype = fields[4], fields[fields.index("-") + 1]
            if (point.startswith(("/proc/", "/sys/")) and fstype in MASK_TYPES
                    and point != "/sys/fs/cgroup"):    # cgroup v1's tmpfs: an empty dir
                found.append(point)
    return found


CGROUP_FIX = ("limit the container itself (`docker run --cpus 2 --memory 4g --pids-limit 512`; "
              "Kubernetes: the container's resources.limits) and let kernels start with what "
              "rlimits can do: --best-effort, or no --cpus")


def cgroups_read_only(mountinfo="/proc/self/mountinfo"):
    """Is every cgroup filesystem mounted read-only here (as Docker, podman and
    Kubernetes mount them in an unprivileged container)?"""
    found = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):
                found.append("ro" in fields[5].split(","))
    return bool(found) and all(found)


def probe():
    """Make each syscall the sandbox needs, and a fresh proc and sysfs mount, in throwaway
    namespaces; {name: errno (0: it worked)}. With harmless arguments: a call the filter
    lets through fails on them (ENOENT, EBADF) or changes only the throwaway namespaces."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        seen = {}
        try:
            _probe_in_child(seen)
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


def _probe_in_child(seen):
    from .mount import FILESYSTEMS
    from .plan import Op
    from .syscalls import CloneFlags, MountAttr, MountFlags, move_mount, mount, mount_setattr, \
        open_tree_clone, pivot_root, sethostname, setns, umount2, unshare

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
    attempt("move_mount", move_mount, -1, nowhere)
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


def denied(seen):
    """The sandbox's syscalls that a filter refused."""
    return [name for name in SANDBOX_SYSCALLS if seen.get(name) in DENIED]
