"""TCP <-> Unix socket relay, for clients whose connection file says `tcp`.

ZMTP is the same bytes over TCP and over a Unix socket, so each accepted TCP connection is
paired with a connection to the kernel's ipc socket of the same channel and bytes are
copied both ways. Flow control: a side is not read while its peer has unsent bytes.

Only the kernel owner's local clients get a twin (peer.py, Sandbox.tcp_clients): another
user's connection is closed as soon as it is accepted.

A client connects as soon as the ports are bound, long before the kernel binds its
sockets: the relay waits for them to appear in the socket dir (inotify), not by polling,
which cost 32 launchers starting at once ~200 wake-ups a second each.

The control port's clients wait longer (STALE_CONTROL): one of them may be a socket that
Jupyter closed, whose last message was meant for the kernel this one replaces.
"""
import errno
import os
import selectors
import socket
import stat
import struct
import sys
import time

from . import peer
from .connection import CHANNELS, socket_path
from .errors import SetupError
from .syscalls import IN_CREATE, IN_MOVED_TO, inotify_watch

CHUNK = 1 << 20

# How long after its launch began a kernel hears nothing on its control port. jupyter_client's
# KernelManager sends shutdown_request on its control socket and, once the kernel's process
# has gone, closes that socket with a linger of 100 ms (KernelManager._connect_control_socket):
# for 100 ms more its unsent messages look for a peer on that port. A restart starts the new
# kernel on the same ports at once, and our listener takes connections before the kernel
# is up, so a kernel that was gone before it read its shutdown_request (its warm client
# killed by the restart's SIGINT while Python started: issue 28) left it to the new one,
# which obeyed and exited 0: "Kernel died before replying to kernel_info". The launch begins
# after that close, so past this delay the closed socket's ZMQ has dropped what it held and
# its connection; a live client's waits, and is relayed. 50 ms more for a late ZMQ timer.
STALE_CONTROL = 0.15


def listen(info):
    """Bind every channel's TCP port before anything else is made: a port already taken
    is reported at once, with nothing to clean up."""
    listeners = []
    try:
        for name in CHANNELS:
            port = info[name]
            family = socket.AF_INET6 if ":" in info["ip"] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            listeners.append(sock)
            # Restarts reuse the ports while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((info["ip"], port))
            except OSError as exc:
                hint = ("another process holds the port; restart the kernel so Jupyter picks "
                        "free ports" if exc.errno == errno.EADDRINUSE else "")
                raise SetupError("bridge", f"bind tcp {info['ip']}:{port} ({name[:-5]})", "",
                                 exc.errno, hint) from None
            sock.listen(16)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return [(sock, info[name]) for sock, name in zip(listeners, CHANNELS)]


class Relay:
    """One client connection and its kernel-side twin."""

    def __init__(self, bridge, tcp, port, path):
        self.bridge, self.tcp, self.port, self.path = bridge, tcp, port, path
        self.unix = None
        self.refused = False   # the kernel's socket exists but does not listen yet
        self.pending = {}   # socket -> bytes still to send to it

    def connect(self):
        """Try the kernel's socket; False while the kernel has not bound it yet, or while
        its port is held (Bridge.held)."""
        if self.bridge.held_for(self.port) > 0:
            return False
        try:
            unix = kernel_socket(self.path, self.bridge.monitor)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.refused = isinstance(exc, ConnectionRefusedError)
            return False
        except OSError:
            unix = None
        if unix is None:
            self.close()
            return True
        unix.setblocking(False)
        self.unix = unix
        self.pending = {self.tcp: b"", self.unix: b""}
        for sock in (self.tcp, self.unix):
            self.bridge.sel.register(sock, selectors.EVENT_READ, self)
        return True

    def peer(self, sock):
        return self.unix if sock is self.tcp else self.tcp

    def handle(self, sock, events):
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(sock)
            if events & selectors.EVENT_READ:
                data = sock.recv(CHUNK)
                if not data:
                    return self.close()
                self.pending[self.peer(sock)] = data
                self._flush(self.peer(sock))
        except (ConnectionError, OSError):
            self.close()

    def _flush(self, sock):
        data = self.pending[sock]
        if data:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            self.pending[sock] = data = data[sent:]
        peer = self.peer(sock)
        # Write interest while bytes wait; stop reading the peer until they are gone.
        self.bridge.sel.modify(sock, self._events(sock), self)
        self.bridge.sel.modify(peer, self._events(peer), self)

    def _events(self, sock):
        events = selectors.EVENT_WRITE if self.pending[sock] else 0
        if not self.pending[self.peer(sock)]:
            events |= selectors.EVENT_READ
        return events

    def close(self):
        for sock in (self.tcp, self.unix):
            if sock is None:
                continue
            try:
                self.bridge.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self.bridge.relays.discard(self)
        self.bridge.waiting.discard(self)


def kernel_socket(path, monitor):
    """A connection to the socket at `path` if it is the kernel's own: a socket (not a link
    to one) whose listener lives in the PID namespace that `monitor` made for the sandbox.
    None if it is not; FileNotFoundError or ConnectionRefusedError while the kernel has not
    bound it. The socket dir is read-only to the kernel once its sockets are bound
    (sandbox.py): this is the second wall, for what it could have done before."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return None
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.connect(path)
        pid = struct.unpack("3i", unix.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  struct.calcsize("3i")))[0]
        # Read now, not when the bridge starts: the monitor makes the namespace after that.
        sandbox = os.stat(f"/proc/{monitor}/ns/pid_for_children").st_ino
        if os.stat(f"/proc/{pid}/ns/pid").st_ino == sandbox:
            return unix
    except BaseException:
        unix.close()
        raise
    unix.close()
    return None


class Bridge:
    def __init__(self, sel, listeners, socket_dir, monitor, owners=None, who="kernel",
                 held=None):
        """owners: the uids whose local clients may connect (None: every uid's). held:
        port -> the time.monotonic() before which its clients are not relayed (they wait,
        accepted, as for a kernel not up yet): STALE_CONTROL."""
        self.sel = sel
        self.held = dict(held or {})
        self.listeners = listeners
        self.socket_dir = socket_dir
        self.monitor = monitor     # its children are the sandbox's PID namespace
        self.owners = owners
        self.who = who
        self.refusals = set()      # each said once in the log: another user could flood it
        self.relays = set()
        self.waiting = set()   # accepted, kernel socket not there yet
        for sock, port in listeners:
            sel.register(sock, selectors.EVENT_READ, self)
        try:
            self.created = inotify_watch(socket_dir, IN_CREATE | IN_MOVED_TO)
            sel.register(self.created, selectors.EVENT_READ, _Drain())
        except OSError:
            self.created = None    # no inotify instance left for this user: poll

    def timeout(self):
        """How long the launcher may sleep: for ever (a new socket wakes it) unless some
        client waits for a socket bound but not listening yet, or there is no inotify, or
        for its port's hold to end."""
        if self.waiting and (self.created is None or any(r.refused for r in self.waiting)):
            return 0.005
        holds = [h for h in (self.held_for(r.port) for r in self.waiting) if h > 0]
        return min(holds) if holds else None

    def held_for(self, port):
        """Seconds its clients still wait on port's hold, or <= 0."""
        until = self.held.get(port)
        return until - time.monotonic() if until is not None else 0.0

    def handle(self, listener, _events):
        port = dict(self.listeners)[listener]
        while True:
            try:
                tcp, _ = listener.accept()
            except BlockingIOError:
                break
            why = self.owners is not None and peer.refused(tcp, self.owners)
            if why:
                tcp.close()
                self._say_refused(port, why)
                continue
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tcp.setblocking(False)
            relay = Relay(self, tcp, port, socket_path(self.socket_dir, port))
            self.relays.add(relay)
            if not relay.connect():
                self.waiting.add(relay)

    def _say_refused(self, port, why):
        if why in self.refusals:
            return
        self.refusals.add(why)
        print(f"ns-kernel: {self.who}: refused a connection to tcp port {port} from {why}: "
              "only the kernel owner's clients may connect (Sandbox.tcp_clients = any lets "
              "every local user in)", file=sys.stderr, flush=True)

    def retry(self):
        """Called after every wake-up while some client waits for the kernel's sockets."""
        for relay in list(self.waiting):
            if relay.connect():
                self.waiting.discard(relay)

    def close(self):
        for relay in list(self.relays):
            relay.close()
        if self.created is not None:
            self.sel.unregister(self.created)
            os.close(self.created)
        for sock, _ in self.listeners:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()


class _Drain:
    """The inotify fd's selector data: read the events; the wake-up is what counts."""

    @staticmethod
    def handle(fd, _events):
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
