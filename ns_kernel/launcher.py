"""The argv launcher: what kernel.json runs as `python -P -m ns_kernel -f {connection_file}`.

It reads like the steps it takes (__main__ has spawned the kernel's interpreter already,
which imports ipykernel meanwhile: prestart.py):
  1. read and check the client's connection file
  2. build the plan (pure; option conflicts die here, before anything exists but, on a
     warm start, the kernel's cgroup: its monitor exists already and its move into the
     cgroup, which waits on cgroup v1, goes on meanwhile)
  3. bind the client's TCP ports (tcp clients) or link its ipc paths (ipc clients)
  4. make the private socket dir and the inner kernel's ipc connection file
  5. start the sandbox (in the kernel's cgroup, with the prestarted interpreter, if any)
  6. relay bytes, forward signals, watch the Jupyter server, until the kernel exits
  7. remove everything made in 3-4 (and the limits' cgroup), say why the kernel died if
     it did not exit cleanly, and exit with the kernel's own status
A warm start without a bridge hands 6 and 7 to the sandbox's monitor once the kernel
runs, and leaves (hand_off): one host process per kernel instead of two.
"""
import os
import re
import selectors
import signal
import socket
import sys
import time
from dataclasses import replace

from . import (bridge, connection, leftovers, limits, mount, notice, offline, output, seccomp,
               socketdir, state, usage)
from .errors import SetupError
from .pid import FORWARDED
from .plan import SOCKET_DIR_INSIDE, Host, Limits, build_plan
from .sandbox import MSG_HANDOFF, Sandbox
from .warm import LEFT, SIGNAL


def kernel_id_from(path):
    match = re.search(r"kernel-([0-9a-fA-F-]+)\.json$", path or "")
    return match.group(1).replace("-", "") if match else ""


def kernel_argv(extra):
    return [sys.executable, "-m", "ipykernel_launcher",
            "-f", f"{SOCKET_DIR_INSIDE}/connection.json", *extra]


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
        self.server = self._server_pidfd()
        try:
            if self.spare_monitor:
                # A warm start's monitor exists already: its cgroup first, and the move into
                # it (cgroup v1 waits 10-15 ms for an RCU grace period) beside the plan's
                # making. A cold launcher, which Jupyter SIGKILLs, makes it after the plan:
                # nobody would remove it before the monitor holds it.
                self._limit(Limits.from_config(self.config))
            if self.connection_file:
                info = connection.read(self.connection_file)
                argv = kernel_argv(self.argv)
            else:
                info, argv = None, command_argv(self.argv)
            host = Host.probe()
            socket_dir = (socketdir.check_length(os.path.abspath(self.exact_socket_dir))
                          if self.exact_socket_dir else socketdir.choose(self.config.socket_dir))
            previous = notice.recall(self.connection_file, info) if info else ""
            if previous:
                argv.append(notice.EXTENSION_ARGV)
            if info and self.config.network not in ("host", "proxy"):
                argv.append(offline.EXTENSION_ARGV)
            if info and connection.CURVE_KEYS[0] in info:
                argv.append(connection.CURVE_CONFIG_ARGV)
            profile = (seccomp.read_profile(self.config.seccomp)
                       if seccomp.is_profile(self.config.seccomp) else None)
            plan = build_plan(self.config, host, argv, socket_dir, self.kernel_id, profile)
            if info:
                plan = replace(plan, sockets=tuple(
                    os.path.basename(connection.socket_path(SOCKET_DIR_INSIDE, info[name]))
                    for name in connection.CHANNELS))
            if not self.spare_monitor:
                self._limit(plan.limits)
            plan = replace(plan, limits=replace(plan.limits, backend=self.limits.backend))
            if info:
                # Known only now: which limits are in force (usage.py shows them).
                plan = replace(plan, argv=(*plan.argv, *usage.argv(plan.limits,
                                                                    self.limits.skipped)))
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
                                    and not self.listeners and plan.network != "proxy")
            owner = (plan.uid_map.outside, plan.gid_map.outside) if host.uid == 0 else None
            self.socket_dir = socketdir.create(socket_dir, owner)
            state.prepare(plan.state_dirs, owner)
            if info:
                connection.write(f"{socket_dir}/connection.json",
                                 connection.inner(info, SOCKET_DIR_INSIDE), *(owner or (None, None)))
            if previous:
                notice.leave_notice(self.socket_dir, previous, owner)
            if info and info["transport"] == "ipc":
                self._link_ipc_paths(info)
            # Taken as given: the admin's binds, and the dirs made just now for this kernel.
            handles = mount.open_sources(plan.mounts, host.cwd, trusted={
                *self.config.ro_binds, *self.config.rw_binds, self.socket_dir,
                *plan.state_dirs})
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

    def _limit(self, wanted):
        """Make the kernel's cgroup (or pick rlimits) for the Limits wanted, and start moving
        what exists already into it: before they fork anything, the kernel is born in the
        kernel's cgroup. It probes the host, so it happens here, not in the pure build_plan."""
        self.limits = limits.enforce(wanted, self.config.cgroup_parent, self.kernel_id)
        self.limits.attach_soon([pid for pid in (self.prestarted and self.prestarted.pid,
                                                 self.spare_monitor) if pid])

    def _kernel_stdio(self):
        read, write = os.pipe2(os.O_CLOEXEC)
        self.output = output.Relay(read, self._who())
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), write, write

    def _who(self):
        if not self.connection_file:
            return "command"
        return f"kernel {self.kernel_id[:8] or os.path.basename(self.connection_file)}"

    def report(self, status):
        """Say in the server log why the kernel ended, if it needs saying (explain)."""
        line = self.explain(status)
        if line:
            print(line, file=sys.stderr, flush=True)

    def explain(self, status):
        """The server log's lines on why the kernel ended (unless it ended by itself with
        status 0) and on what it left where nothing is kept; None if neither. They are
        also kept for the restarted kernel to show."""
        died = describe_exit(status, self._who(), self.usage)
        # A kernel that Jupyter itself stopped with a signal (terminate, a slow restart)
        # did not die on the user: its next incarnation has nothing to tell them of that.
        if died and -os.waitstatus_to_exitcode(status) in self.forwarded:
            told = []
        else:
            told = [died]
        lost = leftovers.describe(*self.box.leftovers, self._who()) if self.box else None
        told = "\n".join(filter(None, [*told, lost]))
        if told and self.connection_file:
            notice.remember(self.connection_file, told, self.notice_fd)
        return "\n".join(filter(None, [died, lost])) or None

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

    def _link_ipc_paths(self, info):
        """An ipc client connects to <ip>-<port>: point those paths at the kernel's sockets."""
        for name in connection.CHANNELS:
            path = f"{info['ip']}-{info[name]}"
            target = connection.socket_path(self.socket_dir, info[name])
            if path == target:
                continue   # the provisioner's client: its paths are the kernel's sockets
            try:
                if os.path.lexists(path) and not os.path.isfile(path):
                    os.unlink(path)   # a stale socket of an earlier kernel
                os.symlink(target, path)
            except OSError as exc:
                raise SetupError("connection", "link ipc socket", path, exc.errno,
                                 "the connection file's ip must name a writable directory") from None
            self.links.append(path)

    def _unlink_ipc_paths(self):
        unlink_ipc_paths(self.links, self.socket_dir)
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
                                self._hand_off()    # and this process is gone, if it could
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

    def _hand_off(self):
        """The kernel runs, and what is left of this process's work the monitor can do as
        well (no bridge: the client talks to the kernel's sockets; no proxy): relay its
        output, watch the server and the requester, say why it died, clean up.
        So hand that to the monitor (a warm template's spare, a fork of the same image),
        and leave: the kernel keeps one host process instead of two (7.6 MB private and
        the interpreter's state this one copied while it read the config and made the
        plan). The monitor gets this object and the fds it holds (taken_over); what the
        requester says meanwhile waits in its socket."""
        import json
        import pickle
        # The monitor may be SIGKILLed (by the user, whose uid it has; by the OOM killer)
        # before it can remove what this launch made; then only the requester, which sees
        # its socket close without a status, is left to (remove_left).
        try:
            os.write(self.requester, LEFT + json.dumps({
                "socket_dir": self.socket_dir, "links": self.links,
                "cgroups": self.limits.cgroup.dirs if self.limits.cgroup else {}}).encode())
        except OSError:
            pass    # it has gone: the monitor sees that, and removes all (Abandoned)
        # The monitor is root in a user namespace of its own when we are root: no capability
        # on the host, where the connection file may be in a dir root does not own.
        try:
            self.notice_fd = os.open(self.connection_file,
                                     os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            pass        # gone, or not a file: the death notice, then, goes nowhere
        state = pickle.dumps(self)
        try:
            socket.send_fds(self.box.ctl, [MSG_HANDOFF + len(state).to_bytes(8, "big")],
                            self._handed_fds())
            self.box.ctl.sendall(state)
        except OSError:
            # The monitor has gone (the kernel died as it started, while this process was
            # slow to get here): it ends the kernel's life as if there were no monitor to
            # hand it to; init's last words wait on the control socket.
            self.handing_off = False
            if self.notice_fd is not None:
                os.close(self.notice_fd)
                self.notice_fd = None
            return
        sys.stderr.flush()
        os._exit(0)

    def _handed_fds(self):
        """What the monitor needs of ours, in the order taken_over takes them."""
        extra = [self.output and self.output.fd, self.server, self.notice_fd]
        return [self.box.ctl.fileno(), self.requester, sys.stderr.fileno(),
                *(fd for fd in extra if fd is not None)]

    @classmethod
    def taken_over(cls, ctl, init, header, fds):
        """In the monitor: the Launch its launcher handed over (header: the size of its
        state, which follows on ctl; fds: _handed_fds's), now this process's, with init
        (our child) as the sandbox's process to watch. ctl: our end of the control socket,
        closed here: init's copy of it is what tells, by closing, that init has gone."""
        import pickle
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

    def __getstate__(self):
        """What hand_off sends: the live handles go as fds (_handed_fds); the config has
        done its work (the plan holds what is left of it)."""
        state = dict(vars(self))
        state.update(config=None, spawn=None, prestarted=None, listeners=[], proxy=None,
                     handing_off=False)
        return state

    def _server_pidfd(self):
        try:
            parent = int(os.environ.get("JPY_PARENT_PID", "0"))
            return os.pidfd_open(parent) if parent > 1 else None
        except ProcessLookupError:
            if not self.connection_file:
                return None     # a command's shell may have inherited a server's long gone
            # Gone before we looked (it died while asking): nobody will talk to this
            # kernel, as ipykernel's own parent poller would conclude.
            raise SetupError("server", f"the Jupyter server (JPY_PARENT_PID {parent}) has "
                             "exited", hint="nothing to start a kernel for") from None
        except (ValueError, OSError):
            return None

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


def unlink_ipc_paths(links, socket_dir):
    """The links to socket_dir's sockets, unless the next kernel's launcher (a restart)
    has made them its own."""
    for path in links:
        try:
            if os.path.dirname(os.readlink(path)) == socket_dir:
                os.unlink(path)
        except OSError:
            pass


def remove_left(left):
    """In the requester of a warm start whose monitor took the kernel over and died
    without a word (SIGKILLed): what the launch made, as Launch._hand_off told (LEFT)."""
    import threading
    from . import cgroup
    unlink_ipc_paths(left["links"], left["socket_dir"])
    socketdir.remove(left["socket_dir"])
    if left["cgroups"]:
        # Beside the caller (a Jupyter server's event loop polls): a cgroup whose kernel
        # held GBs takes seconds to empty. Not a daemon: a client that exits waits for it.
        threading.Thread(target=cgroup.Cgroup(0, left["cgroups"]).remove,
                         name="ns-kernel-remove-cgroup").start()


def describe_exit(status, who, usage=None):
    """One line for the server log when the kernel (`who`) did not end by itself with
    status 0: out of memory, the pids limit, a signal, an exit code."""
    reason = limits.death_reason(os.waitstatus_to_exitcode(status), usage or limits.cgroup.Usage())
    return f"ns-kernel: {who} {reason}" if reason else None
