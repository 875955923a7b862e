"""A kernel's shutdown with children that ended but were never waited for (zombies).

At a shutdown request ipykernel signals its children (SIGTERM, later SIGKILL) until none is
left, and counts a zombie, such as a `subprocess.Popen` the notebook never waited for, as
one left: the kernel signals it again and again, and jupyter_client, after half its
shutdown_wait_time (2.5 s), SIGTERMs the kernel, a plain kernel too. Loaded into every
kernel (the launcher's argv), this IPython extension lets the kernel wait for its own
zombies there and leave every zombie out: the kernel then ends by itself as soon as its
children have, and what is left of the sandbox goes with init.
"""
import os

EXTENSION_ARGV = "--IPKernelApp.extra_extensions=ns_kernel.reaper"


def load_ipython_extension(ip):
    kernel = getattr(ip, "kernel", None)
    children = getattr(kernel, "_process_children", None)
    if children is None:
        return      # an ipykernel without it: its own shutdown, as a plain kernel's
    kernel._process_children = lambda: living(children())


def living(processes):
    """The psutil.Process objects (ipykernel's) that have not ended; the ended ones that
    are this process's children are waited for."""
    import psutil       # ipykernel's, imported by the time it asks for its children
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
                continue
            os.waitpid(process.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass        # gone meanwhile, or a grandchild: its own parent (or init) waits
    return alive
