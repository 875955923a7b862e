"""A kernel without a network (--network loopback or none), in the notebook: where pip or
conda went to a remote index and failed, one line after its own says why and what to do,
since pip's words ("No matching distribution") do not. Where it did not need one
("Requirement already satisfied"), nothing. pip does not retry there (PIP_RETRIES=0, set
by the plan): there is no network to come back.

The command it names works as printed in a terminal (JupyterLab's): the launcher, which
finds the kernel's kernelspec, passes it (argv()): the full path of ns-kernel, the scope
the spec is installed in, its name, display name and other options, and the network.

Loaded into every such kernel as an IPython extension (the launcher adds argv()).
"""
import shlex
import sys

from traitlets import Unicode
from traitlets.config import Configurable

EXTENSION_ARGV = "--IPKernelApp.extra_extensions=ns_kernel.offline"
NETWORK = ("--network", "proxy", "--allow", "pypi")
LINE = ("ns-kernel: this kernel has no network, so {tool} cannot reach a remote index; "
        "install from a wheel or an index in the notebook's folder (`%pip install "
        "./pkg.whl`, `--no-index --find-links ./wheels`), or give its kernelspec one, the "
        "package index and nothing else, in a terminal: `{command}`, then start a new kernel "
        "of it (Kernel > Change Kernel; a restart keeps this one's settings)")


class OfflineHint(Configurable):
    command = Unicode("ns-kernel install " + shlex.join(NETWORK), config=True, help="""
        What gives this kernel's kernelspec a network (kernelspec.install_command), as the
        launcher found it; the default where it found none of ns-kernel's.""")


def argv(config):
    """The kernel's options for this extension (config: the launcher's Sandbox)."""
    from .kernelspec import install_command
    command = install_command(config.kernel_name, NETWORK)
    return [EXTENSION_ARGV, *([f"--OfflineHint.command={command}"] if command else [])]
INDEX_COMMANDS = {"install", "download", "wheel", "index", "search", "create", "update",
                  "upgrade"}
LOCAL_ONLY = {"--no-index", "--offline", "--use-local"}
TOOLS = ("pip", "conda", "mamba", "micromamba")


def load_ipython_extension(ip):
    command = OfflineHint(config=ip.config).command

    def forget(info):
        ip.user_ns.pop("_exit_code", None)

    def warn(result):
        # The cell's last %pip/%conda exit status (IPython's system() keeps it).
        if not ip.user_ns.get("_exit_code"):
            return
        for tool, line in magic_lines(result.info.raw_cell):
            if needs_index(line):
                print(LINE.format(tool=tool, command=command), file=sys.stderr, flush=True)
                return
    # After the cell, in its output; the magics themselves stay IPython's.
    ip.events.register("pre_run_cell", forget)
    ip.events.register("post_run_cell", warn)


def magic_lines(cell):
    """(tool, arguments) of each `%pip ...` / `%conda ...` line of a cell."""
    for line in cell.splitlines():
        words = line.strip().split(None, 1)
        if words and words[0].lstrip("%") in TOOLS and words[0].startswith("%"):
            yield words[0].lstrip("%"), words[1] if len(words) > 1 else ""


def needs_index(line):
    """Whether these magic arguments would go to a remote index: a command that fetches,
    not told to stay local, naming something that is not a local path."""
    import os
    try:
        words = shlex.split(line)
    except ValueError:
        return False
    if not words or words[0] not in INDEX_COMMANDS or LOCAL_ONLY & set(words):
        return False
    names = [w for w in words[1:] if not w.startswith("-")]
    return any(not os.path.exists(os.path.expanduser(w)) for w in names) or "-r" in words
