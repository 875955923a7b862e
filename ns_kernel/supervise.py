"""A running kernel's life on the host, to its end, in one loop for every start path:
relay its output to the server's log, forward Jupyter's signals, watch the Jupyter server
and the warm requester, serve its egress proxy and its TCP bridge; then say why it ended
and remove what its start made (made.py).

A cold launcher runs the loop from the sandbox's start to the end. A warm launcher runs it
until the kernel runs; then, if nothing is left that only it can do (a bridge's relay, a
proxy's threads), it hands the rest to the sandbox's monitor (handoff.py), which runs the
same loop from a Life sent as data.
"""
import os
import selectors
import signal
import sys
from dataclasses import asdict, dataclass, field

from . import bridge, leftovers, limits, notice, output
from .cgroup import Usage
from .errors import SetupError
from .made import Made, remove
from .pid import FORWARDED
from .warm import SIGNAL


class Abandoned(BaseException):
    """Whoever asked the warm template for this kernel is gone: Jupyter killed the warm
    client (a restart, a shutdown now), or the provisioner killed its launcher that way,
    or the server died; nobody will talk to the kernel. Not an Exception: nothing on its
    way out may make it an error line; the launcher leaves silently once it has cleaned up,
    as a SIGKILLed cold launcher's monitor would."""


@dataclass
class Life:
    """What a kernel's supervision knows of it, as plain data (the hand-off sends it)."""
    who: str                        # as a person knows it (launcher.who)
    connection_file: str = ""       # '' for a command of `ns-kernel run`
    made: Made = field(default_factory=Made)
    home_kept: bool = True          # a kernel's home outlives it (leftovers' advice)
    forwarded: list = field(default_factory=list)   # signals Jupyter sent it (quiet ends)

    @classmethod
    def from_dict(cls, fields):
        return cls(**{**fields, "made": Made(**fields["made"])})


class Supervisor:
    """One kernel's supervision. Made before the sandbox starts (Jupyter's signals are
    kept until the kernel runs), given the sandbox (box) once it does, then run()."""

    def __init__(self, life, requester=None):
        self.life = life
        self.server = None          # a pidfd of the Jupyter server (server_pidfd)
        self.requester = requester  # a warm start's request socket (an fd; its owner closes it)
        self.box = None             # the sandbox (sandbox.Sandbox), once started
        self.limits = None          # the launcher's limits.Enforcement (not after a hand-off)
        self.output = None          # the kernel's stdout/stderr relay (output.Relay)
        self.listeners = []         # the bridge's TCP listeners (bridge.listen)
        self.tcp_owners = None      # who may connect to them (None: any uid)
        self.held = {}              # port -> until when its stale messages are dropped
        self.egress = None          # the proxy's policy, with network 'proxy'
        self.proxy = None
        self.prestarted = None      # the kernel's interpreter, until it has become the kernel
        self.started_lines = []     # for the log once the sandbox stands: limits, filter
        self.hand_off = None        # handoff.hand_off, if the monitor may take over
        self.notice_fd = None       # the connection file, open, after a hand-off
        self.pending = []           # what Jupyter sent before the kernel ran
        self.running = False
        self.usage = Usage()        # what the cgroup saw, read once the kernel has ended

    def install_signal_handlers(self):
        for sig in FORWARDED:
            signal.signal(sig, lambda signum, _frame: self.forward(signum))

    def forward(self, signum):
        """A signal from Jupyter (to us, or through the requester) for the kernel."""
        if signum not in self.life.forwarded:
            self.life.forwarded.append(signum)
        if self.running and self.box.pid:
            self.box.signal(signum)
        else:
            self.pending.append(signum)

    def run(self):
        """Supervise the kernel to its end; its raw wait status (as os.waitpid gives)."""
        self._loop()
        status = self._status()
        # Before cleanup removes the cgroup: what it saw tells why the kernel ended.
        group = self.life.made.cgroup()
        self.usage = group.usage() if group else Usage()
        return status

    def _loop(self):
        box = self.box
        sel = selectors.DefaultSelector()
        ours = ((box.pidfd, self._box_ended), (box.ctl, self._said_by_init),
                (box.errors, self._setup_said), (self.server, self._server_ended),
                (self.requester, self._requested),
                (self.output and self.output.fd, self._output_ready))
        for fd, handler in ours:
            if fd is not None:      # box.errors, after a hand-off: the monitor's
                sel.register(fd, selectors.EVENT_READ, handler)
        handlers = [handler for _, handler in ours]
        relay = None
        if self.listeners:
            relay = bridge.Bridge(sel, self.listeners, self.life.made.socket_dir, box.pid,
                                  self.tcp_owners, self.life.who, self.held)
        try:
            while True:
                for key, events in sel.select(relay.timeout() if relay else None):
                    if key.data not in handlers:
                        key.data.handle(key.fileobj, events)    # the bridge's
                    elif key.data(sel) is False:
                        return
                if relay and relay.waiting:
                    relay.retry()
        finally:
            if relay:
                relay.close()
            sel.close()

    def _box_ended(self, sel):
        return False

    def _server_ended(self, sel):
        # The Jupyter server is gone: nobody will ever talk to this kernel.
        self.box.kill()
        return False

    def _setup_said(self, sel):
        """The error pipe: a setup failure, or its close: every child exec'd, the kernel
        runs."""
        box = self.box
        if not box.read_errors():
            return
        sel.unregister(box.errors)
        self._release_prestarted()
        failure = box.failure()
        if failure:
            box.kill()
            raise failure
        # Said once the sandbox stands: a start that fails says only why, in one line.
        for line in notice.unsaid(self.life.connection_file, self.started_lines):
            print(line, file=sys.stderr, flush=True)
        self._deliver_pending()
        if self.hand_off:
            self.hand_off(self)     # and this process is gone, if it could

    def _said_by_init(self, sel):
        box = self.box
        if not box.read_status():
            sel.unregister(box.ctl)
        if box.proxy_listener and not self.proxy:
            from .proxy import Proxy
            self.proxy = Proxy(box.proxy_listener, self.egress, self.life.who,
                               output.log).start()

    def _output_ready(self, sel):
        if self.output.handle() is False:
            sel.unregister(self.output.fd)

    def _requested(self, sel):
        """What the requester says (warm.Launcher): a signal for the kernel, or, once it has
        closed its end, that it has gone: Abandoned."""
        try:
            said = os.read(self.requester, 64)
        except OSError:
            said = b""
        if said:
            if said[:1] == SIGNAL and said[1:].isdigit() and int(said[1:]) in FORWARDED:
                self.forward(int(said[1:]))
            return
        # First the ports and links: a restart makes them again at once.
        self._close_listeners()
        self.life.made.remove_links()
        self.box.kill()
        raise Abandoned

    def _deliver_pending(self):
        """The kernel runs: what Jupyter sent before, but an interrupt, which had nothing
        to interrupt (and would have killed the monitor in its first steps)."""
        self.running = True
        for signum in self.pending:
            if signum != signal.SIGINT:
                self.box.signal(signum)
        self.pending = []

    def _status(self):
        box = self.box
        monitor_status = box.wait()
        # Init sends the kernel's status just before exiting: read what is left of it.
        box.ctl.setblocking(False)
        try:
            while box.read_status():
                pass
        except (BlockingIOError, OSError):
            pass
        errors = box.failure()
        if errors:
            raise errors
        return box.kernel_status if box.kernel_status is not None else monitor_status

    def _release_prestarted(self):
        # The error pipe is closed: the kernel runs, and the interpreter spawned for it has
        # become it, or never will.
        if self.prestarted:
            self.prestarted.close()
            self.prestarted = None

    def report(self, status):
        """Say in the server log why the kernel ended, if it needs saying (explain)."""
        line = self.explain(status)
        if line:
            print(line, file=sys.stderr, flush=True)

    def explain(self, status):
        """explain() of this kernel's end; kept for the restarted kernel to show."""
        told = explain(self.life, status, self.usage, self.box.leftovers if self.box else None)
        if told and self.life.connection_file:
            notice.remember(self.life.connection_file, told, self.notice_fd)
        return told

    def _close_listeners(self):
        for sock, _ in self.listeners:
            sock.close()
        self.listeners = []

    def cleanup(self):
        """Undo what the start made, whatever it got to; the kernel's end is read first
        (explain) where it needs its cgroup."""
        self._release_prestarted()
        if self.server is not None:
            os.close(self.server)
            self.server = None
        if self.box and self.box.pid:
            self.box.kill()
        if self.output:
            self.output.drain()
            self.output = None
        if self.proxy:
            self.proxy.close()
        if self.box and self.box.proxy_listener:
            self.box.proxy_listener.close()     # came too late to serve (the kernel died)
        if self.limits:
            self.limits.settle()    # a failure before attach(): let the move end first
        self._close_listeners()
        remove(self.life.made)

    def handed(self):
        """What the hand-off sends the monitor, as data (handoff.py)."""
        budget = self.output.budget
        return {"life": asdict(self.life),
                # The relay's state: a partial line, and what is left of its budget (a
                # monotonic time is the same clock in every process of the host).
                "output": [self.output.pending.decode("latin-1"), budget.left, budget.at,
                           budget.over]}


def live_on(sup, finish):
    """In a warm kernel's monitor, once its launcher has handed it over (handoff.py): the
    rest of the kernel's life, as the launcher would have lived it; finish(status) as
    there (cli.start_kernel)."""
    sup.install_signal_handlers()
    try:
        status = sup.run()
    finally:
        sup.cleanup()
    sup.report(status)
    finish(status)


def explain(life, status, usage, left=None):
    """The server log's lines on why the kernel ended (unless it ended by itself with
    status 0) and on what it left where nothing is kept (left: (paths, how many more), as
    init reports them); None if neither."""
    # A kernel that Jupyter itself stopped with a signal (a shutdown it did not answer in
    # time, a restart) did not die on anyone: quiet, as a plain kernel's end is (a process
    # limit it once reached is not why it ended), unless the OOM killer came first.
    stopped = -os.waitstatus_to_exitcode(status) in life.forwarded and not usage.oom_kills
    died = None if stopped else describe_exit(status, life.who, usage)
    lost = leftovers.describe(*left, life.who, home_kept=life.home_kept) if left else None
    return "\n".join(filter(None, [died, lost])) or None


def server_pidfd(for_kernel):
    """A pidfd of the Jupyter server that started us (JPY_PARENT_PID), None if it says
    none. Gone already: a kernel has nobody to start for (ipykernel's own parent poller
    would conclude so); a command (`ns-kernel run`) whose shell inherited the variable from
    a server long gone runs all the same."""
    try:
        parent = int(os.environ.get("JPY_PARENT_PID", "0"))
        return os.pidfd_open(parent) if parent > 1 else None
    except ProcessLookupError:
        if not for_kernel:
            return None
        raise SetupError("server", f"the Jupyter server (JPY_PARENT_PID {parent}) has "
                         "exited", hint="nothing to start a kernel for") from None
    except (ValueError, OSError):
        return None


def describe_exit(status, who, usage=None):
    """One line for the server log when the kernel (`who`) did not end by itself with
    status 0: out of memory, the pids limit, a signal, an exit code."""
    reason = limits.death_reason(os.waitstatus_to_exitcode(status), usage or Usage())
    return f"ns-kernel: {who} {reason}" if reason else None
