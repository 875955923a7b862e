"""What a container runtime does to the process that builds sandboxes, and the setting that
undoes each, in the runtime's own words (docs/containers.md): its seccomp profile, its
masked /proc and /sys, the capabilities root keeps, its user namespace's id map.

`ns-kernel doctor` probes them (trial.py makes the sandbox's syscalls in a throwaway set of
namespaces; denied() reads what it saw); a kernel that fails to start says the same fix
(trial.explain, and mount.py for a refused proc or sysfs). Facts and fixes only: this
module imports none of the sandbox's.
"""
import errno
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


def masks_refuse(filesystems, masks=()):
    """Why a fresh proc or sysfs (`filesystems`) is refused, and the fix; masks: the mount
    points over /proc and /sys, if known (masked())."""
    where = f" ({', '.join(masks)} mounted over)" if masks else ""
    return (f"a fresh {' and '.join(filesystems)} mount is refused: the container runtime masks "
            f"parts of /proc and /sys{where}; unmask them: {MASKED_FIX}")


# Root's kernels run as another uid (nobody): the launcher chowns their dirs and maps it.
ROOT_CAPS = {"CAP_CHOWN": 0, "CAP_SETGID": 6, "CAP_SETUID": 7}
ROOT_CAPS_FIX = ("`docker run --cap-add CHOWN --cap-add SETUID --cap-add SETGID` (Kubernetes: "
                 "securityContext.capabilities.add: [CHOWN, SETUID, SETGID]), or run the "
                 "server as an ordinary user (`--user 1000`, runAsUser: 1000)")
CAP_SYS_PTRACE = 19


def root_lacks(missing, uid=None):
    return (f"root's kernels run as {'uid %d' % uid if uid is not None else 'another uid'}, "
            f"but this root lacks {', '.join(missing)} (a container with --cap-drop ALL?): "
            f"{ROOT_CAPS_FIX}")


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


def unmapped_fix(ident, kind="uid"):
    return (f"{kind} {ident} has no mapping in this user namespace ({kind}s {map_text(kind)}: "
            "a container's map?): pick a mapped uid (--uid 1000 --gid 1000) or give the container "
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


READ_ONLY_CGROUPS = "this container's cgroup filesystems are read-only"
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


def denied(seen):
    """The sandbox's syscalls that a filter refused."""
    return [name for name in SANDBOX_SYSCALLS if seen.get(name) in DENIED]
