"""A kernel without a network (--network loopback or none), in the notebook: where pip or
conda went to a remote index and failed, one line after its own says why and what to do,
since pip's words ("No matching distribution") do not. Where it did not need one
("Requirement already satisfied"), nothing. pip does not retry there (PIP_RETRIES=0, set
by the plan): there is no network to come back.

Loaded into every such kernel as an IPython extension (the launcher adds EXTENSION_ARGV).
"""
import shlex
import sys

EXTENSION_ARGV = "--IPKernelApp.extra_extensions=ns_kernel.offline"
LINE = ("ns-kernel: this kernel has no network, so {tool} cannot reach a remote index; "
        "install from a wheel or an index in the notebook's folder (`%pip install "
        "./pkg.whl`, `--no-index --find-links ./wheels`), or ask for a kernelspec with a "
        "network (ns-kernel install --network proxy --allow pypi)")
INDEX_COMMANDS = {"install", "download", "wheel", "index", "search", "create", "update",
                  "upgrade"}
LOCAL_ONLY = {"--no-index", "--offline", "--use-local"}
TOOLS = ("pip", "conda", "mamba", "micromamba")


def load_ipython_extension(ip):
    def forget(info):
        ip.user_ns.pop("_exit_code", None)

    def warn(result):
        # The cell's last %pip/%conda exit status (IPython's system() keeps it).
        if not ip.user_ns.get("_exit_code"):
            return
        for tool, line in magic_lines(result.info.raw_cell):
            if needs_index(line):
                print(LINE.format(tool=tool), file=sys.stderr, flush=True)
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
