"""The warm hand-off: a launcher whose kernel runs, with nothing left to do that the
sandbox's monitor cannot (no TCP bridge, no proxy), hands the rest of the kernel's life
to that monitor and exits: one host process per kernel instead of two.

  hand_off(launch)       in the launcher: tell the requester what the launch made (LEFT),
                         send the Launch and the fds it holds over the control socket, exit
  taken_over(...)        in the monitor: that Launch, now this process's, to live on
"""
import json
import os
import pickle
import socket
import sys

from .errors import SetupError
from .sandbox import MSG_HANDOFF
from .warm import LEFT


def hand_off(launch):
    """What is left of the launcher's work (relay the kernel's output, watch the server
    and the requester, say why the kernel died, clean up), handed to the monitor (a warm
    template's spare, a fork of the same image); then leave. The kernel keeps one host
    process instead of two (7.6 MB private and the interpreter's state the launcher copied
    while it read the config and made the plan). What the requester says meanwhile waits
    in its socket. Returns only if the monitor has gone: the launcher lives on."""
    # The monitor may be SIGKILLed (by the user, whose uid it has; by the OOM killer)
    # before it can remove what this launch made; then only the requester, which sees
    # its socket close without a status, is left to (warm.remove_left).
    try:
        os.write(launch.requester, LEFT + json.dumps({
            "socket_dir": launch.socket_dir, "links": launch.links,
            "cgroups": launch.limits.cgroup.dirs if launch.limits.cgroup else {}}).encode())
    except OSError:
        pass    # it has gone: the monitor sees that, and removes all (Abandoned)
    # The monitor is root in a user namespace of its own when we are root: no capability
    # on the host, where the connection file may be in a dir root does not own.
    try:
        launch.notice_fd = os.open(launch.connection_file,
                                   os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        pass        # gone, or not a file: the death notice, then, goes nowhere
    state = pickle.dumps(launch)
    try:
        socket.send_fds(launch.box.ctl, [MSG_HANDOFF + len(state).to_bytes(8, "big")],
                        _handed_fds(launch))
        launch.box.ctl.sendall(state)
    except OSError:
        # The monitor has gone (the kernel died as it started, while this process was
        # slow to get here): it ends the kernel's life as if there were no monitor to
        # hand it to; init's last words wait on the control socket.
        launch.handing_off = False
        if launch.notice_fd is not None:
            os.close(launch.notice_fd)
            launch.notice_fd = None
        return
    sys.stderr.flush()
    os._exit(0)


def _handed_fds(launch):
    """What the monitor needs of the launcher's, in the order taken_over takes them."""
    extra = [launch.output and launch.output.fd, launch.server, launch.notice_fd]
    return [launch.box.ctl.fileno(), launch.requester, sys.stderr.fileno(),
            *(fd for fd in extra if fd is not None)]


def taken_over(ctl, init, header, fds):
    """In the monitor: the Launch its launcher handed over (header: the size of its state,
    which follows on ctl; fds: _handed_fds's), now this process's, with init (our child)
    as the sandbox's process to watch. ctl: our end of the control socket, closed here:
    init's copy of it is what tells, by closing, that init has gone."""
    size = int.from_bytes(header, "big")
    data = bytearray()
    while len(data) < size:
        chunk = ctl.recv(size - len(data))
        if not chunk:
            raise SetupError("warm", "the launcher's hand-off was cut short")
        data += chunk
    ctl.close()
    launch = pickle.loads(data)
    launcher_ctl, launch.requester, log, *extra = fds
    # The server's log, where the launcher wrote: no longer the kernel's pipe, whose
    # end the relay must see close.
    for target in (1, 2):
        os.dup2(log, target)
    os.close(log)
    launch.box.pid, launch.box.ctl = init, socket.socket(fileno=launcher_ctl)
    if launch.output:
        launch.output.fd = extra.pop(0)
    if launch.server is not None:
        launch.server = extra.pop(0)
    if launch.notice_fd is not None:
        launch.notice_fd = extra.pop(0)
    return launch
