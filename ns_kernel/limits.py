"""Per-kernel limits (memory, processes, CPU) and why a kernel died.

Backends, best first: cgroup v2 in a delegated subtree, cgroup v1 (root), rlimits set by
init. The launcher picks one with enforce() (it probes the host, so it stays out of the
pure build_plan), logs it, and after the kernel's death reads what the cgroup saw and
says why it died (death_reason); notice.py tells the restarted kernel.
"""
import os
import resource
from dataclasses import dataclass, field, replace

from . import cgroup, container, limittable
from .errors import SetupError
from .limittable import BY_NAME, LIMITS

# Every kernel's pids limit, unless configured (Sandbox.pids says why this number).
DEFAULT_PIDS = limittable.DEFAULT_PIDS

# What rlimits can do (limittable: the rows with an rlimit), and what the doctor says of it:
# "RLIMIT_DATA for memory, RLIMIT_NPROC per user namespace for pids; no CPU share".
RLIMIT_CAN = tuple(limit.name for limit in LIMITS if limit.rlimit)
RLIMIT_DETAIL = (", ".join(limit.rlimit_note for limit in LIMITS if limit.rlimit) + "; " +
                 ", ".join(limit.rlimit_note for limit in LIMITS if not limit.rlimit))


@dataclass
class Enforcement:
    """The backend in force for one kernel, and its cgroup if it has one."""
    backend: str = "none"
    cgroup: object = None
    skipped: list = field(default_factory=list)
    moving: object = None       # attach_soon's thread, until attach() has waited for it
    moved: set = field(default_factory=set)
    failed: BaseException = None

    def attach_soon(self, pids):
        """Start moving processes made before the sandbox (the prestarted interpreter, a
        warm start's monitor) into the cgroup, in a thread: on cgroup v1 a move waits for
        an RCU grace period (10-15 ms on this VM), and the launcher's next steps overlap
        it. attach() waits for it, before anything in the sandbox may fork."""
        if not self.cgroup or not pids:
            return
        import threading

        def move():
            try:
                for pid in pids:
                    self.cgroup.attach(pid)
            except BaseException as exc:  # noqa: BLE001 - attach() raises it
                self.failed = exc
        self.moved = set(pids)
        self.moving = threading.Thread(target=move, name="ns-kernel-attach", daemon=True)
        self.moving.start()

    def attach(self, pid):
        self.settle()
        if self.failed:
            raise self.failed
        if self.cgroup and pid not in self.moved:
            self.cgroup.attach(pid)

    def settle(self):
        """Wait for attach_soon's moves to end (the cgroup is removed after: made.py)."""
        if self.moving:
            self.moving.join()
            self.moving = None

    def log_lines(self, limits, who):
        """For the server log: the backend in force, and what best_effort let go."""
        if self.backend == "none":
            return []
        lines = [f"ns-kernel: {who} limits: {describe(limits, self.skipped, self.backend)} "
                 f"(by {self.backend})"]
        if self.skipped:
            lines.append(f"ns-kernel: warning: {who}: {', '.join(self.skipped)} not enforced: "
                         f"{self.backend} cannot (best_effort)")
        return lines


def wanted(limits):
    return [limit.name for limit in LIMITS if getattr(limits, limit.name)]


def describe(limits, skipped=(), backend=""):
    return ", ".join(f"{limit.name} {limit.show(getattr(limits, limit.name), backend)}"
                     for limit in LIMITS
                     if getattr(limits, limit.name) and limit.name not in skipped) or "none"


def probe(cgroup_parent="", mounts=None):
    """[(backend, usable, detail)] in order of preference: what the doctor shows and
    what enforce() walks. mounts: cgroup.hierarchies(), if the caller has read them."""
    mounts = cgroup.hierarchies() if mounts is None else mounts
    parent, why2 = cgroup.v2_parent(mounts, cgroup_parent)
    parents, why1 = cgroup.v1_parents(mounts)
    return [("cgroup2", parent is not None, parent or why2),
            ("cgroup1", bool(parents), ", ".join(sorted(parents)) or why1),
            ("rlimit", True, RLIMIT_DETAIL)]


def first_usable(options):
    """The backend 'auto' picks among probe()'s options (rlimit always works)."""
    return next(o for o in options if o[1])


def choose(options, backend):
    """The option in force: the one `backend` names (usable or not), or auto's pick."""
    if backend == "auto":
        return first_usable(options)
    return next(o for o in options if o[0] == backend)


def rlimit_cannot(need):
    """Which of the limits `need` (names as wanted() gives them) rlimits cannot enforce."""
    return [n for n in need if n not in RLIMIT_CAN]


def decide(limits, cgroup_parent=""):
    """`limits` (plan.Limits, as configured) with the backend that will enforce them, and
    the names of those it cannot (best_effort lets them go; else a SetupError): known before
    the plan is built, nothing made for the kernel yet (enforce makes its cgroup)."""
    need = wanted(limits)
    if not need:
        return replace(limits, backend="none")
    mounts = cgroup.hierarchies()
    options = probe(cgroup_parent, mounts)
    backend = choose(options, limits.backend)
    if not backend[1]:
        raise SetupError("limits", f"limits backend {limits.backend}", hint=backend[2])
    controller = {n: BY_NAME[n].controller for n in need}
    if backend[0] == "cgroup2":
        off = cgroup.enable_v2(backend[2], list(controller.values()))
        skipped = [n for n in need if controller[n] in off]
    elif backend[0] == "cgroup1":
        parents = cgroup.v1_parents(mounts)[0]
        skipped = [n for n in need if controller[n] not in parents]
    else:
        skipped = rlimit_cannot(need)
    if skipped and not limits.best_effort:
        # Under auto, why the better backends were passed over.
        passed_over = options if limits.backend == "auto" else []
        reasons = "; ".join(f"{o[0]}: {o[2]}" for o in passed_over if not o[1])
        fix = "run `ns-kernel doctor`, or allow it with --best-effort"
        if container.cgroups_read_only():
            reasons, fix = container.READ_ONLY_CGROUPS, container.CGROUP_FIX
        raise SetupError("limits", f"{backend[0]} cannot enforce {', '.join(skipped)}", hint=(
            (reasons + "; " if reasons else "") + fix))
    return replace(limits, backend=backend[0], skipped=tuple(skipped))


def enforce(limits, cgroup_parent="", name=""):
    """Make the cgroup (if any) of the backend `limits` was decided for (decide)."""
    if limits.backend not in ("cgroup1", "cgroup2"):
        return Enforcement(limits.backend, None, list(limits.skipped))
    mounts = cgroup.hierarchies()
    # Random too: after a SIGKILLed launcher the old cgroup of a restarted kernel may still
    # be on its way out (the orphaned monitor removes it).
    name = f"ns-kernel-{name[:8] + '-' if name else ''}{os.urandom(4).hex()}"
    if limits.backend == "cgroup2":
        parent = cgroup.v2_parent(mounts, cgroup_parent)[0]
        group, skipped = cgroup.Cgroup.create(2, parent, name, limits)
    else:
        group, skipped = cgroup.Cgroup.create(1, cgroup.v1_parents(mounts)[0], name, limits)
    if set(skipped) - set(limits.skipped):
        # Changed since decide (a controller disabled meanwhile): the plan says otherwise.
        group.remove()
        raise SetupError("limits", f"{limits.backend} cannot enforce "
                         f"{', '.join(sorted(set(skipped) - set(limits.skipped)))}",
                         hint="the cgroup changed while the kernel started; start it again")
    return Enforcement(limits.backend, group, list(limits.skipped))


def cgroup_origin(limits, before=None):
    """The monitor's cgroups before the launcher moves it (None without a cgroup); before:
    read before anyone could (a warm start's monitor, which is moved early)."""
    if not limits.backend.startswith("cgroup"):
        return None
    return before or cgroup.hierarchies()


def leave_cgroup(origin, remove=True):
    """The monitor, orphaned by a SIGKILLed launcher: go back to `origin` and remove the
    kernel's cgroup, which the launcher would have removed. remove=False: the monitor that
    a warm launcher handed its kernel to, which removes it at the end (made.remove)."""
    if origin:
        cgroup.leave(origin, remove)


def share(host_value, least):
    """What one kernel may take of a budget that every process of its uid (and of the
    owner of its user namespace) shares on the host: a sixteenth, so that no one kernel
    drains it for the others and the server, but at least what a notebook needs, and
    never more than the host allows."""
    return min(host_value, max(host_value // 16, least))


# (name, resource, the least a notebook needs): counted per uid on the host, and charged
# to the owner of the sandbox's user namespace too.
SHARED_RLIMITS = (("RLIMIT_SIGPENDING", resource.RLIMIT_SIGPENDING, 256),
                  ("RLIMIT_MSGQUEUE", resource.RLIMIT_MSGQUEUE, 128 << 10))


def cap_shared_budgets():
    """In the sandbox's user namespace (else the host's count of the uid would be
    compared with the lower limit): its share of queued signals and POSIX message
    queue bytes."""
    settings = []
    for name, which, least in SHARED_RLIMITS:
        hard = resource.getrlimit(which)[1]
        host = hard if hard != resource.RLIM_INFINITY else least * 16
        settings.append((name, which, share(host, least)))
    _setrlimits(settings)


def apply_rlimits(limits):
    """The last-resort backend, applied by init after unshare(CLONE_NEWUSER), so that
    RLIMIT_NPROC counts the sandbox's processes, not every process of the uid."""
    if limits.backend != "rlimit":
        return
    _setrlimits([limit.rlimit(getattr(limits, limit.name)) for limit in LIMITS
                 if limit.rlimit and getattr(limits, limit.name)])


def _setrlimits(settings):
    for name, which, value in settings:
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as exc:
            raise SetupError("limits", f"setrlimit({name}, {value})", "",
                             getattr(exc, "errno", 0) or 22) from None


def mib(size):
    return f"{size / (1 << 20):.0f} MiB"


def death_reason(code, usage):
    """Why the kernel ended, from its exit code (negative: a signal) and the cgroup's
    counters; None if it ended by itself with status 0."""
    import signal
    if usage.oom_kills:
        peak = f", peak {mib(usage.memory_peak)}" if usage.memory_peak else ""
        return f"killed: out of memory (limit {mib(usage.memory_limit)}{peak})"
    if code < 0:
        try:
            text = f"killed by {signal.Signals(-code).name}"
        except ValueError:     # real-time signals have no name
            text = f"killed by signal {-code}"
        if -code == signal.SIGSYS:      # what seccomp's kill actions look like
            text += " (a system call its seccomp filter forbids)"
    elif code:
        text = f"exited with status {code}"
    else:
        return None
    if usage.pids_refused:
        text += f" after reaching its process limit ({usage.pids_limit})"
    return text
