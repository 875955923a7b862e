"""What varies by limit (memory, processes, CPU), one row each, as systemd-nspawn keeps its
mounts: the Sandbox trait and its help (config), the plan's value (plan.Limits), how the
log and the doctor show it (limits.describe), the cgroup controller and the files that
enforce it in v1 and v2 (cgroup), the rlimit that stands in for it (limits.apply_rlimits),
and whether jupyter-resource-usage shows it (usage). A new limit is a new row, with the
functions that apply it.

Imports nothing of the sandbox's: config, plan, cgroup, limits, usage and doctor read it.
"""
import resource
from dataclasses import dataclass

from .sizes import format_size, parse_size

# Every kernel's, unless configured (Sandbox.pids says why this number).
DEFAULT_PIDS = 4096
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limit:
    name: str            # the Sandbox trait, its --flag, the plan.Limits field
    trait: str           # the trait's traitlets type
    default: object      # the trait's default
    help: str            # the trait's help (`ns-kernel --help-all`)
    none: object         # the plan's value for "no limit"
    parse: object        # trait value -> the plan's value; ValueError says what is wrong
    show: object         # (the plan's value, backend) -> how the log and the doctor say it
    controller: str      # the cgroup controller that enforces it (v1: its hierarchy)
    cgroup_files: object  # (version, value) -> [(file, value, only if the file exists)]
    rlimit: object       # value -> (name, resource, value) set by init, or None: rlimits cannot
    rlimit_note: str     # what the rlimit backend does for it (limits.probe)
    rlimit_caveat: str   # how that differs from the cgroup (the doctor)
    usage_panel: bool    # usage.py makes jupyter-resource-usage show it as the sandbox's


def _count(value):
    if value < 0:
        raise ValueError(f"{value} is negative (0 means no limit)")
    return value


def _memory_files(version, value):
    # Swap is not a way around the limit.
    if version == 2:
        return [("memory.max", value, False), ("memory.swap.max", 0, True)]
    return [("memory.limit_in_bytes", value, False), ("memory.memsw.limit_in_bytes", value, True)]


def _cpu_files(version, value):
    quota = max(1000, int(value * CPU_PERIOD_US))
    if version == 2:
        return [("cpu.max", f"{quota} {CPU_PERIOD_US}", False)]
    return [("cpu.cfs_period_us", CPU_PERIOD_US, False), ("cpu.cfs_quota_us", quota, False)]


def _memory_rlimit(value):
    # RLIMIT_DATA, not RLIMIT_AS: an idle kernel already maps ~740 MB of address space,
    # while DATA fails big allocations with MemoryError and leaves threads working.
    return ("RLIMIT_DATA", resource.RLIMIT_DATA, value)


def _pids_rlimit(value):
    # Only a privilege on the host could raise the hard limit; a lower one holds anyway.
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return ("RLIMIT_NPROC", resource.RLIMIT_NPROC,
            value if hard == resource.RLIM_INFINITY else min(value, hard))


LIMITS = (
    Limit("memory", "Unicode", "", """
        Memory limit of the whole sandbox (e.g. 512M, 2G; '' = none). Enforced by a cgroup
        when one can be made, else by RLIMIT_DATA (see limits_backend).""",
          none=0, parse=parse_size,
          # RLIMIT_DATA holds each process, not their sum, and counts no tmpfs page.
          show=lambda v, backend: format_size(v) + (" per process" if backend == "rlimit" else ""),
          controller="memory", cgroup_files=_memory_files, rlimit=_memory_rlimit,
          rlimit_note="RLIMIT_DATA for memory",
          rlimit_caveat="memory gives MemoryError instead of a kill", usage_panel=True),
    Limit("pids", "Int", DEFAULT_PIDS, f"""
        Maximum number of processes and threads in the sandbox (0 = none). Enforced by the
        pids cgroup when one can be made, else by RLIMIT_NPROC counted in the sandbox's own
        user namespace (never above the host's own RLIMIT_NPROC). Default {DEFAULT_PIDS}:
        a fork bomb in one cell stops there instead of filling the host's process table,
        while a multiprocessing pool on a big machine, each worker with a thread per core
        (BLAS, OpenMP), still fits; OpenShift's default pod limit is the same number.""",
          none=0, parse=_count, show=lambda v, backend: str(v),
          controller="pids", cgroup_files=lambda version, v: [("pids.max", v, False)],
          rlimit=_pids_rlimit, rlimit_note="RLIMIT_NPROC per user namespace for pids",
          rlimit_caveat="pids count per sandbox", usage_panel=False),
    Limit("cpus", "Float", 0.0, """
        CPU share of the sandbox in cores (e.g. 1.5; 0 = none), by the cpu cgroup's quota.
        The rlimit fallback cannot share CPU: there it is an error unless best_effort.""",
          # RLIMIT_CPU caps total seconds, it is not a share of a core.
          none=0.0, parse=_count, show=lambda v, backend: f"{v:g}",
          controller="cpu", cgroup_files=_cpu_files, rlimit=None, rlimit_note="no CPU share",
          rlimit_caveat="no CPU share", usage_panel=True),
)
BY_NAME = {limit.name: limit for limit in LIMITS}
CONTROLLERS = tuple(limit.controller for limit in LIMITS)
