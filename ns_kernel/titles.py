"""What `ps` shows for each long-lived process of ours: what it is, and which kernel it
serves. A forked process shows its parent's command line until it says otherwise, so each
says so as it takes on its role (syscalls.set_process_title):

  ns-kernel-template PYTHON           the warm template of that interpreter (template.py)
  ns-kernel-template spare ROLE       the pair it keeps forked for the next request
  ns-kernel-launcher ID               a warm launcher (a cold one is what Jupyter exec'd:
                                      `python -P -m ns_kernel ... -f .../kernel-ID.json`)
  ns-kernel-monitor ID                a sandbox's monitor, on the host
  ns-kernel-init                      its PID 1 (sandbox.py)
  PYTHON -m ipykernel_launcher ...    the kernel, however it started: its own argv, as an
                                      exec'd kernel's command line is

ID is the kernel's name as the server log and its hostname (isolated-ID) give it. The
kernel's command line is the kernel's to read (/proc/self/cmdline), and so is init's: they
hold nothing of the host's (the connection file and socket dir are their inside paths).
"""
import os
import sys

from .syscalls import set_process_title

TEMPLATE = "ns-kernel-template"
LAUNCHER = "ns-kernel-launcher"
MONITOR = "ns-kernel-monitor"


def template():
    set_process_title(f"{TEMPLATE} {sys.executable}")


def template_python(cmdline):
    """The interpreter of a template, from its /proc/PID/cmdline; None if not a template's."""
    words = cmdline.rstrip(b"\0").decode(errors="replace").split(" ", 1)
    return words[1] if words[0] == TEMPLATE and len(words) == 2 else None


def spare(role):
    set_process_title(f"{TEMPLATE} spare {role}")


def launcher(connection_file, kernel_id):
    """A warm launcher: by Jupyter's kernel id (launcher.kernel_id_from), else (a
    temporary connection file: nbconvert, nbclient) that file's name, as the log names it
    (launcher.Launch._who)."""
    name = kernel_id[:8] or os.path.basename(connection_file).removesuffix(".json")
    set_process_title(f"{LAUNCHER} {name}")


def monitor(plan):
    set_process_title(f"{MONITOR} {plan.hostname.rsplit('-', 1)[-1]}")


def kernel(argv):
    """A kernel that runs in an interpreter forked or spawned before it (preload.py):
    what an exec'd one shows, its argv, and its short name, the interpreter's."""
    set_process_title(" ".join(argv), os.path.basename(argv[0]))
