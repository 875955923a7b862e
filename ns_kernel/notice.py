"""Why the previous kernel died, told to the next one (Jupyter's automatic restart).

The launcher keeps the server log's line (limits.death_reason) in the kernel's
connection file; the next launcher of the same kernel takes it out and leaves it in the
new sandbox's socket dir, where this module, loaded as an IPython extension, prints it
with the first cell's output. The same file keeps what the launcher said in the log once
the sandbox stood (unsaid): a restart does not say it again, unless it changed.
"""
import json
import os

from . import connection
from .errors import SetupError

NOTICE_INSIDE = "/run/ns-kernel/previous-exit"
EXTENSION_ARGV = "--IPKernelApp.extra_extensions=ns_kernel.notice"
NOTICE_KEY = "ns_kernel_previous_exit"
SAID_KEY = "ns_kernel_said"


def remember(connection_file, line, fd=None):
    """Keep the server log's line for the restarted kernel, in the client's connection
    file: jupyter_client starts the restarted kernel from the same file and deletes it at
    shutdown, so the reason lives exactly as long as the kernel and nothing is left
    behind. (A restart with new random ports, in a kernel's first seconds, rewrites the
    file: that restart shows no reason, the server log still has it.) fd: the file, open
    for writing, rewritten in place (a warm kernel's monitor, which may not reach its
    dir: handoff.hand_off); nobody reads it before the kernel's end is told."""
    try:
        if fd is None:
            with open(connection_file) as f:
                info = json.load(f)
        else:
            info = json.loads(os.pread(fd, 1 << 20, 0))
        info[NOTICE_KEY] = line
        if fd is None:
            _replace_json(connection_file, info)
        else:
            # Written over, then cut to length: the file is never empty on the way (the
            # line only adds to it, unless an older one was longer).
            data = json.dumps(info).encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
    except (OSError, ValueError, SetupError):
        pass   # the reason is in the server log; the notebook just won't show it


def unsaid(connection_file, lines):
    """Of the launcher's lines once the sandbox stands (its limits, its seccomp filter),
    those the kernel's previous start (a restart: the same connection file) did not say
    already, all of them if any changed; kept in the connection file, as the reason of a
    death is, so that the server log says each fact of a kernel once."""
    if not (connection_file and lines):
        return lines
    try:
        with open(connection_file) as f:
            info = json.load(f)
        if info.get(SAID_KEY) == lines:
            return []
        _replace_json(connection_file, {**info, SAID_KEY: lines})
    except (OSError, ValueError):
        pass    # said again, at worst
    return lines


def recall(connection_file, info):
    """The previous sandbox's line ('' if none), taken out of the connection file so a
    later restart does not repeat it."""
    line = info.get(NOTICE_KEY, "")
    if line:
        try:
            _replace_json(connection_file, {k: v for k, v in info.items() if k != NOTICE_KEY})
        except (OSError, SetupError):
            pass
    return line


def _replace_json(path, info):
    """Atomically, and 0600 from the start (connection.write): the file holds the key."""
    tmp = f"{path}.ns-kernel-{os.getpid()}"
    connection.write(tmp, info)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def leave_notice(socket_dir, reason, owner=None):
    """Put the reason where the restarted kernel reads it (NOTICE_INSIDE)."""
    path = os.path.join(socket_dir, os.path.basename(NOTICE_INSIDE))
    with open(path, "w") as f:
        f.write(reason)
    if owner:
        os.chown(path, *owner)


def load_ipython_extension(ip):
    """In the restarted kernel: print why the previous one died, with the first cell's
    output (stream output before any request would reach no cell in the notebook)."""
    import sys
    try:
        with open(NOTICE_INSIDE) as f:
            line = f.read().strip()
    except OSError:
        return

    def show(*_):
        ip.events.unregister("pre_run_cell", show)
        print(f"{line}; this is a new kernel", file=sys.stderr, flush=True)
    ip.events.register("pre_run_cell", show)
