"""The warm hand-off: a launcher whose kernel runs, with nothing left to do that the
sandbox's monitor cannot (no TCP bridge, no proxy), hands the rest of the kernel's life
to that monitor and exits: one host process per kernel instead of two.

  hand_off(sup)          in the launcher: tell the requester what the launch made (LEFT),
                         send the kernel's Life as data (JSON) and the fds its supervision
                         holds over the control socket, exit
  taken_over(...)        in the monitor: a Supervisor of that Life, this process's now

Data, not a pickled object: the monitor, a fork of the same template, takes no code from
the launcher, which held the client's environment and read its config.
"""
import json
import os
import socket
import sys

from . import output
from .errors import SetupError
from .sandbox import MSG_HANDOFF, Sandbox
from .supervise import Life, Supervisor
from .warm import LEFT


def hand_off(sup):
    """What is left of the launcher's work (relay the kernel's output, watch the server
    and the requester, say why the kernel died, clean up), handed to the monitor (a warm
    template's spare, a fork of the same image); then leave. The kernel keeps one host
    process instead of two (7.6 MB private and the interpreter's state the launcher copied
    while it read the config and made the plan). What the requester says meanwhile waits
    in its socket. Returns only if the monitor has gone: the launcher lives on."""
    # The monitor may be SIGKILLed (by the user, whose uid it has; by the OOM killer)
    # before it can remove what this launch made; then only the requester, which sees
    # its socket close without a status, is left to (warm.Launcher).
    try:
        os.write(sup.requester, LEFT + sup.life.made.dumps())
    except OSError:
        pass    # it has gone: the monitor sees that, and removes all (Abandoned)
    # The monitor is root in a user namespace of its own when we are root: no capability
    # on the host, where the connection file may be in a dir root does not own.
    try:
        sup.notice_fd = os.open(sup.life.connection_file,
                                os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        pass        # gone, or not a file: the death notice, then, goes nowhere
    handed = sup.handed()
    handed.update(server=sup.server is not None, notice=sup.notice_fd is not None)
    state = json.dumps(handed).encode()
    fds = [sup.box.ctl.fileno(), sup.requester, sys.stderr.fileno(), sup.output.fd,
           *(fd for fd in (sup.server, sup.notice_fd) if fd is not None)]
    try:
        socket.send_fds(sup.box.ctl, [MSG_HANDOFF + len(state).to_bytes(8, "big")], fds)
        sup.box.ctl.sendall(state)
    except OSError:
        # The monitor has gone (the kernel died as it started, while this process was
        # slow to get here): it ends the kernel's life as if there were no monitor to
        # hand it to; init's last words wait on the control socket.
        sup.hand_off = None
        if sup.notice_fd is not None:
            os.close(sup.notice_fd)
            sup.notice_fd = None
        return
    sys.stderr.flush()
    os._exit(0)


def taken_over(ctl, init, header, fds):
    """In the monitor: a Supervisor of the Life its launcher handed over (header: the size
    of its state, which follows on ctl; fds: hand_off's), with init (our child) as the
    sandbox's process to watch. ctl: our end of the control socket, closed here: init's
    copy of it is what tells, by closing, that init has gone."""
    size = int.from_bytes(header, "big")
    data = bytearray()
    while len(data) < size:
        chunk = ctl.recv(size - len(data))
        if not chunk:
            raise SetupError("warm", "the launcher's hand-off was cut short")
        data += chunk
    ctl.close()
    handed = json.loads(data)
    launcher_ctl, requester, log, output_fd, *extra = fds
    # The server's log, where the launcher wrote: no longer the kernel's pipe, whose
    # end the relay must see close.
    for target in (1, 2):
        os.dup2(log, target)
    os.close(log)
    sup = Supervisor(Life.from_dict(handed["life"]), requester=requester)
    sup.box = Sandbox.adopted(init, socket.socket(fileno=launcher_ctl))
    sup.output = output.Relay(output_fd, sup.life.who)
    pending, budget = handed["output"][0], sup.output.budget
    sup.output.pending = pending.encode("latin-1")
    budget.left, budget.at, budget.over = handed["output"][1:]
    if handed["server"]:
        sup.server = extra.pop(0)
    if handed["notice"]:
        sup.notice_fd = extra.pop(0)
    sup.running = True
    return sup
