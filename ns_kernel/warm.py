"""Warm start (opt-in: `--warm` in kernel.json's argv, `ns-kernel install --warm`).

A cold start pays for two interpreters (the launcher's, with traitlets; the kernel's, with
IPython) before the kernel answers. A warm start pays for neither: a per-user template
process has imported both already and forks, per kernel:

  client     what Jupyter runs (`python -P -m ns_kernel --warm -f FILE`): imports next to
             nothing, hands its argv, environment, cwd and stdio to the template, forwards
             signals, and exits like the kernel did
  launcher   a fork of the template that becomes `python -m ns_kernel -f FILE` for that
             client (cli.start_kernel, the same Launch as a cold start: config, plan,
             socket dir, bridge, limits) except that it hands the plan to a monitor the
             template forked beside it instead of forking one: it holds the client's
             environment (tokens), a kernel must not
  monitor    another fork of the template, made with the launcher (while that reads the
             config) and waiting for its plan, with the same sandbox.py steps as ever (user
             ns, then init: mounts, hostname, uid, caps), except the kernel's last step:
             ipykernel is already imported, so it runs in-process instead of execve

Nothing a kernel does reaches the template (each kernel is a fork, the template never runs
user code and never reads a request: its children do), and the template's memory never
held a secret: it is exec'd with only the variables that shape Python's startup
(preload.py), and it is keyed by them, by the interpreter and by the installed ns_kernel.
Honest differences from a cold start: kernels from one template share its address-space
layout (ASLR) and str hash seed; /proc/PID/cmdline shows the template's command line.

The template listens on <socket base>/warm-<key>.sock (the 0700 per-user dir of
socketdir.py), is started by the first warm client (that start costs a cold one), and
exits after IDLE_EXIT seconds without a request, or on `python -m ns_kernel.warm stop`.

This module's top level stays cheap: the client imports it before anything else.
"""
import os
import signal
import socket
import sys

from . import preload

IDLE_EXIT = 600.0
MAX_REQUEST = 1 << 20


def socket_path(environ=os.environ):
    """One template per user, interpreter, startup environment and ns_kernel install."""
    import zlib
    from .socketdir import default_base
    here = os.path.dirname(os.path.abspath(__file__))
    key = zlib.crc32(repr((sys.executable, sorted(preload.startup_env(environ).items()))).encode())
    # The code, not file times: a reinstall of the same code keeps the template.
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                key = zlib.crc32(f.read(), key)
    return os.path.join(default_base(), f"warm-{key:08x}.sock")


# -- the client ---------------------------------------------------------------------------

def client_main(start):
    """What Jupyter runs for `start` (argv.KernelStart) with --warm. Returns (or exits)
    like the kernel did."""
    from .pid import exit_like, forward_signals
    sock = _connect_or_start()
    request = {"kind": "kernel", "argv": start.argv(), "env": dict(os.environ),
               "cwd": os.getcwd(), "client": os.getpid()}
    socket.send_fds(sock, [_dumps(request)], [0, 1, 2])
    launcher = int(sock.recv(64) or 0)
    if not launcher:
        print("ns-kernel: the warm template failed to start a kernel (run without --warm "
              "to see why)", file=sys.stderr, flush=True)
        return 1

    forward_signals(launcher)
    data = sock.recv(64)
    if not data.startswith(b"S"):
        print("ns-kernel: the warm kernel's launcher died", file=sys.stderr, flush=True)
        return 1
    exit_like(int(data[1:]))


def _connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def _connect_or_start(timeout=60.0):
    path = socket_path()
    sock = _connect(path)
    if sock:
        return sock
    import time
    from .socketdir import ensure_base
    ensure_base(os.path.dirname(path))
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    # The template daemonizes (its first fork); this child returns at once.
    try:
        child = preload.spawn("ns_kernel.warm:template_main", [path], stdio=devnull)
    finally:
        os.close(devnull)
    os.waitpid(child, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = _connect(path)
        if sock:
            return sock
        time.sleep(0.005)
    from .errors import SetupError
    raise SetupError("warm", "start the warm template", path,
                     hint="start the kernel without --warm: what stops the template stops it too")


def _dumps(obj):
    import pickle
    return pickle.dumps(obj)


# -- the template -------------------------------------------------------------------------

def template_main(path=None):
    path = path or sys.argv[1]
    if os.fork():
        os._exit(0)
    os.setsid()
    os.chdir("/")
    import gc
    failed = preload.import_kernel_modules(("ns_kernel.cli", "ns_kernel.launcher"))
    if failed:
        sys.exit(f"ns-kernel: warm template: {failed}")
    if preload.threads() != 1:
        sys.exit(f"ns-kernel: warm template has {preload.threads()} threads after its imports")
    import fcntl
    # One template per path: clients that all found none start one each; the first to
    # lock serves, the others leave (the lock dies with its holder, the socket file not).
    # The holder removes the lock file as it leaves; so a lock won on a file that is no
    # longer at its path (removed meanwhile) is no lock: leave too.
    lock_path = path + ".lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(lock_path).st_ino != os.fstat(lock).st_ino:
            sys.exit(0)
    except (BlockingIOError, FileNotFoundError):
        sys.exit(0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        os.unlink(path)    # a stale socket of a template that died
    except FileNotFoundError:
        pass
    listener.bind(path)
    listener.listen(64)
    mine = os.stat(path).st_ino

    def leave(*_):
        # Unless a newer template has taken the path over already.
        if os.path.exists(path) and os.stat(path).st_ino == mine:
            os.unlink(path)
        os.unlink(lock_path)    # ours while we hold it (see above)
        # At once: unwinding an interpreter that imported ipykernel (atexit, zmq) is slow.
        os._exit(0)

    # Children are reaped by the kernel; each forked child restores SIGCHLD first.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, leave)
    gc.freeze()        # the imports stay shared with every kernel: never touched again
    import select
    try:
        while select.select([listener], [], [], IDLE_EXIT)[0]:
            conn, _ = listener.accept()
            if _peer(conn)[1] != os.getuid():
                conn.close()
                continue
            # Two forks per request: one reads it; the other, made now while the first
            # reads the config, is the monitor of the sandbox it may ask for (or leaves).
            asks, waits = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            if os.fork() == 0:
                _leave_template(listener, lock, conn, asks)
                _spare_monitor(waits)          # never returns
            if os.fork() == 0:
                _leave_template(listener, lock, waits)
                _serve(conn, asks)             # never returns
            for sock in (conn, asks, waits):
                sock.close()
    finally:
        leave()


def _leave_template(listener, lock, *socks):
    """A forked child's first step: nothing of the template's that it does not need."""
    listener.close()
    os.close(lock)
    for sock in socks:
        sock.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _peer(conn):
    """(pid, uid, gid) of the other end."""
    import struct
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def _serve(conn, monitor):
    """In a fresh fork of the template: read the one request and act on it. monitor: a
    socket to the spare monitor forked beside this process (_spare_monitor)."""
    import pickle
    try:
        conn.settimeout(30)     # a client that connects and says nothing
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 8)
        conn.settimeout(None)
        request = pickle.loads(data) if data else {"kind": "none"}
        kind = request["kind"]
        if kind == "stop":
            os.kill(os.getppid(), signal.SIGTERM)
        elif kind == "kernel":
            _launcher_child(conn, request, fds, monitor)
    finally:
        os._exit(0)


def _take_stdio(fds):
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)


def _launcher_child(conn, request, fds, monitor):
    """Become `python -m ns_kernel ARGV` for the client, from its environment and cwd."""
    import functools
    from . import cli
    from .argv import kernel_start
    _take_stdio(fds)
    os.environ.clear()
    os.environ.update(request["env"])
    _die_with(request["client"])
    os.chdir(request["cwd"])
    conn.sendall(str(os.getpid()).encode())

    def finish(status):
        conn.sendall(b"S%d" % status)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    spawn = functools.partial(_spawn_monitor, monitor)
    code = cli.start_kernel(kernel_start(request["argv"]), spawn=spawn, finish=finish)
    finish((code or 0) << 8)


def _die_with(client):
    """The client is what Jupyter kills (restart, shutdown now): go as a SIGKILLed cold
    launcher goes, at once and silently; the monitor then removes the sandbox, its socket
    dir and cgroup (sandbox._supervise). This process never unshares: a thread may wait."""
    import select
    import threading
    pidfd = os.pidfd_open(client)

    def watch():
        select.select([pidfd], [], [])
        os._exit(137)
    threading.Thread(target=watch, daemon=True).start()


def _spawn_monitor(monitor, plan, ctl, err_w):
    """Sandbox.start's spawn: hand the plan to the spare monitor; returns its pid."""
    socket.send_fds(monitor, [_dumps(plan)], [ctl.fileno(), err_w, 0, 1, 2])
    pid = monitor.recv(64)
    if not pid:
        from .errors import SetupError
        raise SetupError("warm", "the warm template's spare monitor exited")
    return int(pid)


def _spare_monitor(sock):
    """Forked by the template beside each request: becomes the monitor of the sandbox the
    request's launcher asks for; leaves if it asks for none (the socket closes)."""
    import functools
    import pickle
    from . import forked, sandbox
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 5)
    except OSError:
        os._exit(0)
    if not data or len(fds) != 5:
        os._exit(0)
    plan = pickle.loads(data)
    ctl_fd, err_w, *stdio = fds
    _take_stdio(stdio)
    for fd in (ctl_fd, err_w):
        os.set_inheritable(fd, False)   # err_w closes at execve, as in a cold start
    ctl = socket.socket(fileno=ctl_fd)
    sock.sendall(str(os.getpid()).encode())
    sock.close()
    if preload.threads() != 1:
        # unshare(CLONE_NEWUSER) would fail with EINVAL: say why instead.
        from .errors import SetupError
        forked.report(err_w, SetupError("warm", f"warm template has {preload.threads()} threads",
                                        hint="unshare(CLONE_NEWUSER) needs one thread"))
        os._exit(127)
    forked.run(functools.partial(sandbox._monitor, kernel_step=preload.run_preloaded),
               plan, ctl, err_w)


def template_pid():
    """The pid of the running template, None if none listens (tests, bench/)."""
    sock = _connect(socket_path())
    if sock is None:
        return None
    with sock:
        return _peer(sock)[0]


def stop():
    """Ask the running template (if any) to exit; True if there was one."""
    sock = _connect(socket_path())
    if sock is None:
        return False
    with sock:
        socket.send_fds(sock, [_dumps({"kind": "stop"})], [])
        sock.recv(1)
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["stop"]:
        sys.exit(0 if stop() else 1)
    sys.exit("usage: python -m ns_kernel.warm stop")
