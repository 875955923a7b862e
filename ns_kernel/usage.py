"""The kernel usage panel of jupyter-resource-usage, for a kernel with --memory or --cpus.

The panel sends a `usage_request` on the control channel; ipykernel answers it with psutil:
the kernel's own numbers (kernel_cpu, kernel_memory: its process tree, as right inside the
sandbox as outside) and the host's (cpu_count, host_cpu_percent, host_virtual_memory), read
from /proc/meminfo and /proc/stat, which no namespace changes. A kernel with limits dies
at its own limit, not at the host's, so the launcher loads this IPython extension with the
limits in force (argv()), and it makes each usage_reply say the sandbox's instead:
  memory   total: the limit; used: what the sandbox's processes hold (PSS, every process of
           its PID namespace, orphans too) and its tmpfs mounts (/tmp, /dev/shm, ...), which
           the memory limit counts too; available, free and percent from those
  CPU      cpu_count: the limit, rounded up; host_cpu_percent: the kernel's CPU as a share
           of the limit
The kernel cannot read its cgroup (it has its own cgroup namespace and no cgroup mount), so
the limits come from the launcher, on the kernel's command line.
"""
import math
import os

from traitlets import Float, Int
from traitlets.config import Configurable

EXTENSION_ARGV = "--IPKernelApp.extra_extensions=ns_kernel.usage"


class SandboxUsage(Configurable):
    """The limits in force for this kernel, as the launcher passes them."""

    memory = Int(0, config=True, help="Memory limit in force, bytes; 0: none (host's numbers).")
    cpus = Float(0.0, config=True, help="CPU limit in force, cores; 0: none (host's numbers).")


def argv(limits, skipped=()):
    """The kernel's options for the limits (plan.Limits) in force, those not `skipped`
    (best_effort): none without a limit the panel shows (limittable: usage_panel)."""
    from .limittable import LIMITS
    shown = {limit.name: limit.none if limit.name in skipped else getattr(limits, limit.name)
             for limit in LIMITS if limit.usage_panel}
    if not any(shown.values()):
        return []
    return [EXTENSION_ARGV, *(f"--SandboxUsage.{name}={value:g}" if isinstance(value, float)
                              else f"--SandboxUsage.{name}={value}"
                              for name, value in shown.items())]


def load_ipython_extension(ip):
    limits = SandboxUsage(config=ip.config)
    session = ip.kernel.session
    send = session.send

    # ipykernel sends the reply itself, from its handler: the reply is changed on its way
    # out, so the kernel's own numbers stay ipykernel's.
    def send_sandbox_usage(stream, msg_or_type, content=None, *args, **kwargs):
        if msg_or_type == "usage_reply" and isinstance(content, dict):
            content = sandbox_usage(content, limits)
        return send(stream, msg_or_type, content, *args, **kwargs)
    session.send = send_sandbox_usage


def sandbox_usage(content, limits):
    """ipykernel's usage_reply content, with the sandbox's limits where it has them."""
    content = dict(content)
    if limits.cpus:
        content["cpu_count"] = math.ceil(limits.cpus)
        if "kernel_cpu" in content:
            content["host_cpu_percent"] = min(100.0, content["kernel_cpu"] / limits.cpus)
    if limits.memory:
        used = processes_memory() + tmpfs_memory()
        left = max(0, limits.memory - used)
        content["host_virtual_memory"] = {
            "total": limits.memory, "used": used, "available": left, "free": left,
            "percent": round(100.0 * used / limits.memory, 1)}
    return content


def processes_memory():
    """PSS of every process the kernel sees: its PID namespace is the sandbox."""
    import psutil      # ipykernel's dependency
    total = 0
    for process in psutil.process_iter():
        try:
            info = process.memory_full_info()
        except (psutil.Error, OSError):
            continue    # init is not dumpable; a process may end meanwhile
        total += getattr(info, "pss", info.rss)
    return total


def tmpfs_memory():
    """Bytes in the sandbox's tmpfs mounts: memory, counted by the limit."""
    total, seen = 0, set()
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] != "tmpfs":
                continue
            path = fields[1].replace("\\040", " ")
            try:
                st = os.statvfs(path)
                dev = os.stat(path).st_dev
            except OSError:
                continue
            if dev not in seen:
                seen.add(dev)
                total += (st.f_blocks - st.f_bfree) * st.f_frsize
    return total
