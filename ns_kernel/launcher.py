"""The argv launcher: what kernel.json runs as `python -P -m ns_kernel -f {connection_file}`.

It reads like the steps it takes (__main__ has spawned the kernel's interpreter already,
which imports ipykernel meanwhile: prestart.py):
  1. read and check the client's connection file
  2. decide which backend enforces the limits, and build the plan: complete, pure;
     option conflicts die here, before anything exists
  3. make the kernel's cgroup, and start moving into it what exists already (the
     prestarted interpreter, a warm start's monitor: cgroup v1 waits meanwhile)
  4. bind the client's TCP ports (tcp clients) or link its ipc paths (ipc clients)
  5. make the private socket dir and the inner kernel's ipc connection file
  6. start the sandbox (in the kernel's cgroup, with the prestarted interpreter, if any)
  7. relay bytes, forward signals, watch the Jupyter server, until the kernel exits
  8. remove everything made in 3-5, say why the kernel died if it did not exit cleanly
     (and not by Jupyter's own signal), and exit with the kernel's own status
A warm start without a bridge hands 7 and 8 to the sandbox's monitor once the kernel
runs, and leaves (hand_off): one host process per kernel instead of two.
"""
import os
import re
import selectors
import signal
import sys
import time

from . import (bridge, connection, handoff, leftovers, limits, mount, notice, offline, output,
               reaper, seccomp, socketdir, state, usage)
from .errors import SetupError
from .net import MODES as NETWORK_MODES
from .pid import FORWARDED
from .plan import SOCKET_DIR_INSIDE, Host, Limits, build_plan, under
from .sandbox import Sandbox
from .warm import SIGNAL


def kernel_id_from(path):
    match = re.search(r"kernel-([0-9a-fA-F-]+)\.json$", path or "")
    return match.group(1).replace("-", "") if match else ""


def kernel_argv(extra):
    return [sys.executable, "-m", "ipykernel_launcher",
            "-f", f"{SOCKET_DIR_INSIDE}/connection.json", *extra]


def kernel_extensions(info, config, previous, limits_in_force):
    """What the kernel loads besides ipykernel (IPython extensions, config): the notice of
    why the previous one died, the offline hint, CurveZMQ's keys, the usage panel's limits;
    and, always, the reaper (a quick shutdown with children)."""
    extra = [reaper.EXTENSION_ARGV, *([notice.EXTENSION_ARGV] if previous else [])]
    if NETWORK_MODES[config.network].offline_hint:
        extra.append(offline.EXTENSION_ARGV)
    if connection.CURVE_KEYS[0] in info:
        extra.append(connection.CURVE_CONFIG_ARGV)
    return [*extra, *usage.argv(limits_in_force, limits_in_force.skipped)]


def kernel_sockets(info):
    """The names of the kernel's sockets in its socket dir, one per channel."""
    return tuple(os.path.basename(connection.socket_path(SOCKET_DIR_INSIDE, info[name]))
                 for name in connection.CHANNELS)


def command_argv(argv):
    if not argv:
        raise SetupError("usage", "no command", hint="use `ns-kernel run [options] -- CMD`")
    import shutil   # `ns-kernel run` only; a kernel's start need not pay for it
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if not path:
        raise SetupError("run", f"command not found: {argv[0]}", hint="give its full path")
    return [os.path.abspath(path), *argv[1:]]


class Abandoned(BaseException):
    """Whoever asked the warm template for this kernel is gone: Jupyter killed the warm
    client (a restart, a shutdown now), or the provisioner killed its launcher that way,
    or the server died; nobody will talk to the kernel. Not an Exception: nothing on its
    way out may make it an error line; the launcher leaves silently once it has cleaned up,
    as a SIGKILLed cold launcher's monitor would."""


class Launch:
    """One kernel's launch: everything it made, so that all of it can be undone."""

    def __init__(self, sandbox_config, connection_file=None, argv=(), socket_dir=None,
                 spawn=None, prestarted=None, requester=None, spare_monitor=None):
        """With a connection file, run ipykernel (argv: its extra arguments); without one,
        run argv itself (`ns-kernel run`). socket_dir: this exact (not yet existing) socket
        dir instead of a fresh one under Sandbox.socket_dir (the provisioner's choice).
        spawn: who starts the sandbox's monitor (see Sandbox.start; warm.py).
        prestarted: the kernel's interpreter, spawned already (prestart.py). requester:
        the warm template's request socket (warm.py), which turns readable when its other
        end is closed: Abandoned. spare_monitor: the pid spawn will make the monitor (a
        warm template's, forked before the request), moved into the cgroup early; it takes
        over from this process once the kernel runs, unless a bridge needs this one."""
        self.config = sandbox_config
        self.connection_file = connection_file
        self.argv = list(argv)
        self.listeners = []
        self.links = []
        self.socket_dir = None
        self.exact_socket_dir = socket_dir
        self.spawn = spawn
        self.prestarted = prestarted
        self.box = None
        self.pending_signals = []  # what Jupyter sent before the kernel ran
        self.running = False       # the sandbox stands and the kernel runs
        self.forwarded = set()     # signals Jupyter sent (through us) to the sandbox
        self.kernel_id = kernel_id_from(connection_file)
        self.folder = os.getcwd()  # the notebook's: a kernel without an id is named by it
        self.limits = limits.Enforcement()
        self.usage = None          # what the cgroup saw, read once the kernel has ended
        self.output = None         # the kernel's stdout/stderr relay (output.py)
        self.started_lines = []    # for the log once the sandbox stands: limits, filter
        self.proxy = None          # its egress proxy, with network 'proxy' (proxy.py)
        self.server = None         # a pidfd of the Jupyter server, if it says which it is
        self.requester = requester      # an fd: the caller closes it
        self.spare_monitor = spare_monitor
        self.handing_off = False   # the monitor takes over once the kernel runs (hand_off)
        self.notice_fd = None      # the connection file, open, in the monitor (taken_over)
        # After Jupyter started this launch (its client's fork, for a warm one): a restart's
        # stale control messages expire counting from before it (bridge.STALE_CONTROL).
        self.began = time.monotonic()
        self.control_port = None   # the bridge's, held until began + STALE_CONTROL

    def run(self):
        """Run the kernel to its end; return its wait status (raw, as os.waitpid gives)."""
        self._install_signal_handlers()
        # From the start: a server that dies while the sandbox is built is seen too.
        self.server = server_pidfd(bool(self.connection_file))
        try:
            if self.connection_file:
                info = connection.read(self.connection_file)
                argv = kernel_argv(self.argv)
            else:
                info, argv = None, command_argv(self.argv)
            host = Host.probe(binds=(*self.config.ro_binds, *self.config.rw_binds),
                              writable=(*self.config.rw_binds,
                                        *(["~"] if self.config.home == "shared" else [])))
            socket_dir = (socketdir.check_length(os.path.abspath(self.exact_socket_dir))
                          if self.exact_socket_dir else socketdir.choose(self.config.socket_dir))
            previous = notice.recall(self.connection_file, info) if info else ""
            # Which backend enforces the limits, and what it cannot: nothing made yet.
            limits_in_force = limits.decide(Limits.from_config(self.config),
                                            self.config.cgroup_parent)
            if info:
                argv += kernel_extensions(info, self.config, previous, limits_in_force)
            profile = (seccomp.read_profile(self.config.seccomp)
                       if seccomp.is_profile(self.config.seccomp) else None)
            plan = build_plan(self.config, host, argv, socket_dir, self.kernel_id, profile,
                              limits_in_force, kernel_sockets(info) if info else ())
            # The kernel's cgroup, and the move into it of what exists already (the
            # prestarted interpreter, a warm start's monitor): on cgroup v1 it waits for an
            # RCU grace period (10-15 ms here), beside the steps up to the sandbox's start.
            self._limit(plan.limits)
            self.started_lines = self.limits.log_lines(plan.limits, self._who())
            if not plan.seccomp or plan.seccomp.source:
                self.started_lines.append(f"ns-kernel: {self._who()}: " + (
                    f"seccomp profile {plan.seccomp.source}" if plan.seccomp else
                    "no seccomp filter (Sandbox.seccomp = off)"))
            if info and info["transport"] == "tcp":
                self.listeners = bridge.listen(info)
                self.control_port = info["control_port"]
            # The template's spare monitor can do all that is left but a bridge's relay and
            # a proxy's threads: a process that has unshared a PID namespace for its
            # children cannot start a thread (clone(2): EINVAL).
            self.handing_off = bool(info and self.spare_monitor and self.requester is not None
                                    and not self.listeners and not NETWORK_MODES[plan.network].proxy)
            owner = (plan.uid_map.outside, plan.gid_map.outside) if host.uid == 0 else None
            self.socket_dir = socketdir.create(socket_dir, owner)
            state.prepare(plan.state_dirs, owner)
            if info:
                connection.write(f"{socket_dir}/connection.json",
                                 connection.inner(info, SOCKET_DIR_INSIDE), *(owner or (None, None)))
            if previous:
                notice.leave_notice(self.socket_dir, previous, owner)
            if info and info["transport"] == "ipc":
                # An ipc client connects to <ip>-<port>: point those at the kernel's sockets.
                self.links = socketdir.link_ipc_paths(info, self.socket_dir)
            # Taken as given: the dirs made just now for this kernel.
            handles = mount.open_sources(plan.mounts, host.cwd, trusted={
                self.socket_dir, *plan.state_dirs})
            # A kernel's stdio: /dev/null and a pipe to the log (output.py); a command of
            # `ns-kernel run` keeps the admin's terminal.
            stdio = self._kernel_stdio() if info else (0, 1, 2)
            try:
                self.box = Sandbox(plan, self.limits.attach, self.prestarted,
                                   handles, stdio).start(self.spawn)
            finally:
                mount.close_all(handles)    # the monitor has them now
                if info:
                    mount.close_all(set(stdio))
            return self._to_end()
        finally:
            self.cleanup()

    def resume(self):
        """In the monitor, once the launcher has handed the kernel over (hand_off): the
        rest of the kernel's life, as the launcher would have lived it."""
        self._install_signal_handlers()
        try:
            return self._to_end()
        finally:
            self.cleanup()

    def _to_end(self):
        self._supervise()
        status = self._status()
        self.usage = self.limits.usage()
        return status

    def _limit(self, decided):
        """Make the kernel's cgroup for the Limits decided (limits.decide), and start moving
        what exists already into it: before they fork anything, the kernel is born in the
        kernel's cgroup."""
        self.limits = limits.enforce(decided, self.config.cgroup_parent, self.kernel_id)
        self.limits.attach_soon([pid for pid in (self.prestarted and self.prestarted.pid,
                                                 self.spare_monitor) if pid])

    def _kernel_stdio(self):
        read, write = os.pipe2(os.O_CLOEXEC)
        self.output = output.Relay(read, self._who())
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), write, write

    def _who(self):
        """The kernel as a person knows it: Jupyter's kernel id, else (nbconvert, nbclient,
        nbgrader: a temporary connection file) that file's name and the notebook's folder."""
        if not self.connection_file:
            return "command"
        if self.kernel_id:
            return f"kernel {self.kernel_id[:8]}"
        home, folder = os.path.expanduser("~"), self.folder
        name = os.path.basename(self.connection_file).removesuffix(".json")
        return f"kernel {name} in {'~' + folder[len(home):] if under(folder, home) else folder}"

    def report(self, status):
        """Say in the server log why the kernel ended, if it needs saying (explain)."""
        line = self.explain(status)
        if line:
            print(line, file=sys.stderr, flush=True)

    def explain(self, status):
        """The server log's lines on why the kernel ended (unless it ended by itself with
        status 0) and on what it left where nothing is kept; None if neither. They are
        also kept for the restarted kernel to show."""
        usage = self.usage or limits.cgroup.Usage()
        # A kernel that Jupyter itself stopped with a signal (a shutdown it did not answer in
        # time, a restart) did not die on anyone: quiet, as a plain kernel's end is (a
        # process limit it once reached is not why it ended), unless the OOM killer came first.
        stopped = -os.waitstatus_to_exitcode(status) in self.forwarded and not usage.oom_kills
        died = None if stopped else describe_exit(status, self._who(), usage)
        lost = leftovers.describe(*self.box.leftovers, self._who(), home_kept=not any(
            dot for _, dot in self.box.plan.discarded)) if self.box else None
        told = "\n".join(filter(None, [died, lost]))
        if told and self.connection_file:
            notice.remember(self.connection_file, told, self.notice_fd)
        return told or None

    def _install_signal_handlers(self):
        for sig in FORWARDED:
            signal.signal(sig, lambda signum, _frame: self._forward(signum))

    def _forward(self, signum):
        """A signal from Jupyter (to us, or through the requester) for the kernel."""
        self.forwarded.add(signum)
        if self.running and self.box.pid:
            self.box.signal(signum)
        else:
            self.pending_signals.append(signum)

    def _unlink_ipc_paths(self):
        socketdir.unlink_ipc_paths(self.links, self.socket_dir)
        self.links = []

    def _supervise(self):
        box = self.box
        sel = selectors.DefaultSelector()
        monitor = os.pidfd_open(box.pid)
        sel.register(monitor, selectors.EVENT_READ, "monitor")
        if box.errors is not None:      # else the monitor, which took over once it closed
            sel.register(box.errors, selectors.EVENT_READ, "errors")
        sel.register(box.ctl, selectors.EVENT_READ, "ctl")
        if self.server is not None:
            sel.register(self.server, selectors.EVENT_READ, "server")
        if self.requester is not None:
            sel.register(self.requester, selectors.EVENT_READ, "requester")
        relay = None
        if self.listeners:
            owners = None if self.config.tcp_clients == "any" else {os.getuid()}
            relay = bridge.Bridge(sel, self.listeners, self.socket_dir, box.pid, owners,
                                  self._who(), held={
                                      self.control_port: self.began + bridge.STALE_CONTROL})
        if self.output:
            sel.register(self.output.fd, selectors.EVENT_READ, "output")
        try:
            while True:
                timeout = relay.timeout() if relay else None
                for key, events in sel.select(timeout):
                    if key.data == "monitor":
                        return
                    if key.data == "errors":
                        if box.read_errors():
                            sel.unregister(box.errors)
                            self._release_prestarted()
                            failure = box.failure()
                            if failure:
                                box.kill()
                                raise failure
                            # Said once the sandbox stands: a start that fails says
                            # only why, in one line.
                            for line in self.started_lines:
                                print(line, file=sys.stderr, flush=True)
                            self._deliver_pending()
                            if self.handing_off:
                                handoff.hand_off(self)  # and this process is gone, if it could
                    elif key.data == "ctl":
                        if not box.read_status():
                            sel.unregister(box.ctl)
                        if box.proxy_listener and not self.proxy:
                            from .proxy import Proxy
                            self.proxy = Proxy(box.proxy_listener, box.plan.egress,
                                               self._who(), output.log).start()
                    elif key.data == "output":
                        if self.output.handle() is False:
                            sel.unregister(self.output.fd)
                    elif key.data == "requester":
                        self._requested()
                    elif key.data == "server":
                        # The Jupyter server is gone: nobody will ever talk to this kernel.
                        box.kill()
                        return
                    else:
                        key.data.handle(key.fileobj, events)
                if relay and relay.waiting:
                    relay.retry()
        finally:
            if relay:
                relay.close()
            sel.close()
            os.close(monitor)

    def _requested(self):
        """What the requester says (warm.Launcher): a signal for the kernel, or, once it has
        closed its end, that it has gone: Abandoned."""
        try:
            said = os.read(self.requester, 64)
        except OSError:
            said = b""
        if said:
            if said[:1] == SIGNAL and said[1:].isdigit() and int(said[1:]) in FORWARDED:
                self._forward(int(said[1:]))
            return
        # First the ports and links: a restart makes them again at once.
        for sock, _ in self.listeners:
            sock.close()
        self._unlink_ipc_paths()
        self.box.kill()
        raise Abandoned

    def __getstate__(self):
        """What handoff.hand_off sends: the live handles go as fds; the config has
        done its work (the plan holds what is left of it)."""
        state = dict(vars(self))
        state.update(config=None, spawn=None, prestarted=None, listeners=[], proxy=None,
                     handing_off=False)
        return state

    def _deliver_pending(self):
        """The kernel runs: what Jupyter sent before, but an interrupt, which had nothing
        to interrupt (and would have killed the monitor in its first steps)."""
        self.running = True
        for signum in self.pending_signals:
            if signum != signal.SIGINT:
                self.box.signal(signum)
        self.pending_signals = []

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

    def cleanup(self):
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
        self.limits.remove()
        for sock, _ in self.listeners:
            sock.close()
        self._unlink_ipc_paths()
        if self.socket_dir:
            socketdir.remove(self.socket_dir)


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
    reason = limits.death_reason(os.waitstatus_to_exitcode(status), usage or limits.cgroup.Usage())
    return f"ns-kernel: {who} {reason}" if reason else None
