"""One kernel's cgroup, v2 or v1: made by the launcher before the sandbox starts, the
monitor moved into it right after fork (everything the sandbox forks inherits it), read
after the kernel dies (was it the OOM killer? the pids limit?), removed at cleanup.

v2: one directory under a parent where this user may create cgroups (a delegated subtree,
    or the root's own hierarchy for real root), with the controllers enabled there.
v1: one directory per controller (memory, pids, cpu), under ns-kernel/ in the launcher's
    own cgroup of each hierarchy, so a kernel never escapes the limits the server runs
    under. The ns-kernel/ level is there because a hierarchy's root dir is 0555: the
    monitor (no capabilities in the host's user namespace) could not remove a kernel
    cgroup made right in it when it cleans up after a SIGKILLed launcher.
"""
import os
import signal
import time
from dataclasses import dataclass

from .errors import SetupError
from .limittable import BY_NAME, CONTROLLERS, LIMITS


@dataclass(frozen=True)
class Usage:
    """What the cgroup saw, read once the kernel is dead: the facts behind "why it died"."""
    oom_kills: int = 0
    memory_limit: int = 0
    memory_peak: int = 0
    pids_limit: int = 0
    pids_refused: int = 0     # forks and clones refused at pids.max


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _keyed(text):
    """'oom_kill 1\\nmax 0' (memory.events, pids.events, memory.oom_control) -> dict."""
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _write(path, value):
    """os.write, not file.write: cgroup files report EINVAL/EBUSY on the write itself."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def hierarchies():
    """{'cgroup2': (mount, dir), 'memory': (mount, dir), ...}: where each hierarchy is
    mounted and where this process's own cgroup in it lives (v1 keys are controllers)."""
    paths = {}
    for line in read("/proc/self/cgroup").splitlines():
        _, names, path = line.split(":", 2)
        for name in (names.split(",") if names else ["cgroup2"]):
            paths[name] = path
    found = {}
    for line in read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options, root, target = fields[sep + 1], fields[sep + 3], fields[3], fields[4]
        names = ["cgroup2"] if fstype == "cgroup2" else (
            [o for o in options.split(",") if o in CONTROLLERS]
            if fstype == "cgroup" else [])
        for name in names:
            path = paths.get(name)
            if path is None or name in found:
                continue
            # A mount of a sub-tree (a container's cgroup): own path is relative to its root.
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            found[name] = (target, os.path.normpath(os.path.join(target, rel)))
    return found


def v2_parent(mounts, cgroup_parent=""):
    """The v2 directory that will hold kernels' cgroups, or (None, reason); mounts as
    hierarchies() returns them."""
    uid = os.getuid()
    if "cgroup2" not in mounts:
        return None, "no cgroup v2 hierarchy is mounted"
    if cgroup_parent:
        parent = cgroup_parent
    elif uid == 0:
        # Real root may use the hierarchy's top (exempt from "no internal processes"),
        # as docker's cgroupfs driver does; an ordinary user needs one delegated to them.
        parent = os.path.join(mounts["cgroup2"][0], "ns-kernel")
    else:
        return None, ("no delegated cgroup v2 subtree: set Sandbox.cgroup_parent "
                      "(--cgroup-parent) to one this user may write")
    base = parent if os.path.isdir(parent) else os.path.dirname(parent)
    available = set(read(os.path.join(base, "cgroup.controllers")).split())
    if not available & set(CONTROLLERS):
        return None, (f"cgroup v2 at {base} offers none of {', '.join(CONTROLLERS)} (bound "
                      "to cgroup v1 hierarchies, or not delegated)")
    if not os.access(base, os.W_OK):
        return None, f"cgroup v2 at {base} is not writable by uid {uid}"
    return parent, ""


def v1_parents(mounts):
    """{'memory': dir, ...} for the v1 controllers mounted, or ({}, reason); mounts as
    hierarchies() returns them."""
    uid = os.getuid()
    found = {c: mounts[c][1] for c in CONTROLLERS if c in mounts}
    if not found:
        return {}, f"no cgroup v1 {', '.join(CONTROLLERS[:-1])} or {CONTROLLERS[-1]} hierarchy is mounted"
    unwritable = [d for d in found.values() if not os.access(d, os.W_OK)]
    if unwritable:
        return {}, f"cgroup v1 needs root ({unwritable[0]} is not writable by uid {uid})"
    return found, ""


def enable_v2(parent, controllers):
    """Controllers are usable in a child only if enabled in the parent's subtree_control;
    ns-kernel's own parent dir may need making and enabling first. Returns those of
    `controllers` that are not enabled there."""
    if not os.path.isdir(parent):
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass
        _enable_in(os.path.dirname(parent), controllers)
    _enable_in(parent, controllers)
    enabled = set(read(os.path.join(parent, "cgroup.subtree_control")).split())
    return [c for c in controllers if c not in enabled]


def _enable_in(path, controllers):
    have = set(read(os.path.join(path, "cgroup.subtree_control")).split())
    available = set(read(os.path.join(path, "cgroup.controllers")).split())
    for c in controllers:
        if c not in have and c in available:
            # EBUSY (processes live there) leaves the limit reported unenforced.
            _try_write(os.path.join(path, "cgroup.subtree_control"), f"+{c}")


class Cgroup:
    """One kernel's cgroup: dirs maps each controller to its directory (the same one
    for all controllers in v2)."""

    def __init__(self, version, dirs):
        self.version = version
        self.dirs = dirs

    @classmethod
    def create(cls, version, parents, name, limits):
        """Make the cgroup and write the limits. parents: the v2 parent dir, or v1's
        {controller: dir}. Returns (cgroup, names of the limits it cannot enforce)."""
        wanted = {limit.name: limit.controller for limit in LIMITS if getattr(limits, limit.name)}
        if version == 2:
            dirs = {c: os.path.join(parents, name) for c in wanted.values()}
        else:
            dirs = {c: os.path.join(parents[c], "ns-kernel", name)
                    for c in wanted.values() if c in parents}
        self = cls(version, dirs)
        unenforced = []
        try:
            if version == 2:
                off = enable_v2(parents, wanted.values())
                unenforced = [limit for limit, c in wanted.items() if c in off]
            for path in sorted(set(dirs.values())):
                os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                os.mkdir(path, 0o755)
            for limit, controller in wanted.items():
                if controller not in dirs or limit in unenforced:
                    unenforced.append(limit)
                    continue
                self._set(limit, getattr(limits, limit))
        except OSError as exc:
            self.remove()
            raise SetupError("limits", f"cgroup v{version}", exc.filename or "", exc.errno,
                             "check the cgroup's delegation, or set Sandbox.limits_backend") \
                from None
        return self, sorted(set(unenforced))


    def _set(self, name, value):
        """Write the files of the limit `name` (its row's cgroup_files), in order."""
        limit = BY_NAME[name]
        d = self.dirs[limit.controller]
        for file, setting, only_if_present in limit.cgroup_files(self.version, value):
            if not only_if_present or os.path.exists(f"{d}/{file}"):
                _write(f"{d}/{file}", setting)

    def attach(self, pid):
        """Move `pid` (the monitor, before it forks anything) into every directory."""
        for path in sorted(set(self.dirs.values())):
            try:
                _write(f"{path}/cgroup.procs", pid)
            except OSError as exc:
                raise SetupError("limits", "move the sandbox into", f"{path}/cgroup.procs",
                                 exc.errno, "the launcher's own cgroup must lie in the same "
                                 "delegated subtree") from None

    def usage(self):
        """Read the counters that tell why a kernel died; call before remove()."""
        mem, pids = self.dirs.get("memory"), self.dirs.get("pids")
        facts = {}
        if mem and self.version == 2:
            events = _keyed(read(f"{mem}/memory.events"))
            facts.update(oom_kills=events.get("oom_kill", 0),
                         memory_limit=int(read(f"{mem}/memory.max", "0").replace("max", "0")),
                         memory_peak=int(read(f"{mem}/memory.peak", "0") or 0))
        elif mem:
            control = _keyed(read(f"{mem}/memory.oom_control"))
            facts.update(oom_kills=control.get("oom_kill", 0),
                         memory_limit=int(read(f"{mem}/memory.limit_in_bytes", "0")),
                         memory_peak=int(read(f"{mem}/memory.max_usage_in_bytes", "0")))
        if pids:
            facts.update(pids_limit=int(read(f"{pids}/pids.max", "0").replace("max", "0")),
                         pids_refused=_keyed(read(f"{pids}/pids.events")).get("max", 0))
        return Usage(**facts)

    def remove(self):
        """Kill what is left (normally nothing: the PID namespace died with init) and
        remove the directories; rmdir fails with EBUSY until the last task has exited,
        which for processes holding GBs takes seconds (2 s was seen to leave empty
        cgroups behind): up to 10 s."""
        for path in sorted(set(self.dirs.values()), reverse=True):
            if not os.path.isdir(path):
                continue
            for _ in range(1000):
                if os.path.exists(f"{path}/cgroup.kill"):
                    _try_write(f"{path}/cgroup.kill", 1)
                else:
                    for task in read(f"{path}/cgroup.procs").split():
                        try:
                            os.kill(int(task), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def leave(origin, remove=True):
    """Move this process back to its cgroups in `origin` (hierarchies() from before it
    was attached), then remove the kernel cgroups it leaves (unless not remove)."""
    for name, (_, now) in hierarchies().items():
        before = origin.get(name, (None, None))[1]
        if before and now != before and os.path.basename(now).startswith("ns-kernel-"):
            try:
                _write(f"{before}/cgroup.procs", os.getpid())
            except OSError:
                continue   # still inside: removing it would mean killing ourselves
            if remove:
                Cgroup(0, {name: now}).remove()


def _try_write(path, value):
    try:
        _write(path, value)
    except OSError:
        pass
