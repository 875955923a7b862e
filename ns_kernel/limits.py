"""Per-kernel limits: memory, processes, CPU."""
import resource

from .errors import SetupError


def apply_rlimits(limits):
    """The last-resort backend, applied by init after unshare(CLONE_NEWUSER), so that
    RLIMIT_NPROC counts the sandbox's processes, not every process of the uid."""
    if limits.backend != "rlimit":
        return
    settings = []
    if limits.memory:
        # RLIMIT_DATA, not RLIMIT_AS: an idle kernel already maps ~740 MB of address space,
        # while DATA fails big allocations with MemoryError and leaves threads working.
        settings.append(("RLIMIT_DATA", resource.RLIMIT_DATA, limits.memory))
    if limits.pids:
        settings.append(("RLIMIT_NPROC", resource.RLIMIT_NPROC, limits.pids))
    for name, which, value in settings:
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as exc:
            raise SetupError("limits", f"setrlimit({name}, {value})", "",
                             getattr(exc, "errno", 0) or 22) from None
