"""Warm start: the default (`--cold` or `--no-prestart` in kernel.json's argv opt out).

A cold start pays for two interpreters (the launcher's, with traitlets; the kernel's, with
IPython) before the kernel answers. A warm start pays for neither: a per-user template
process has imported both already and forks, per kernel:

  client     what Jupyter runs (`python -P -m ns_kernel -f FILE`): imports next to
             nothing, hands its argv, environment, cwd and stdio to the template, forwards
             signals, and exits like the kernel did. The provisioner, in the Jupyter
             server, sends the same request itself when a template listens (launch,
             Launcher): no client process at all on JupyterLab's path
  launcher   a fork of the template that becomes `python -m ns_kernel -f FILE` for that
             client (cli.start_kernel, the same launcher.run as a cold start: config, plan,
             socket dir, bridge, limits) except that it hands the plan to a monitor the
             template forked beside it instead of forking one: it holds the client's
             environment (tokens), a kernel must not. Once the kernel runs, unless it
             bridges TCP, it hands the rest of its work to the monitor and exits
             (handoff.hand_off)
  monitor    another fork of the template, made with the launcher (while that reads the
             config) and waiting for its plan, with the same sandbox.py steps as ever (user
             ns, then init: mounts, hostname, uid, caps), except the kernel's last step:
             ipykernel is already imported, so it runs in-process instead of execve. Taking
             over from the launcher, it leaves the kernel's cgroup first

Nothing a kernel does reaches the template (each kernel is a fork, the template never runs
user code and never reads a request: its children do), and the template's memory never
held a secret: it is exec'd with only the variables that shape Python's startup
(preload.py), and it is keyed by them, by the interpreter and by the installed ns_kernel.
Honest differences from a cold start: kernels from one template share its address-space
layout (ASLR) and str hash seed.

The template listens on <socket base>/warm-<key>.sock (the 0700 per-user dir of
socketdir.py), is started by the first warm client (that start costs a cold one), and
exits after template.IDLE_EXIT seconds without a request, or on `python -m ns_kernel.warm stop`.

Who may talk to whom: each side checks the other before it trusts it (untrusted): the
same uid, and the host's own user namespace, which no kernel is in (a kernel of an
ordinary user has that user's uid). A client checks the base too, and talks to no
template in a dir another user made: it starts the kernel cold instead (__main__). A
request is plain data (JSON) of one of template.KINDS; a kernel's argv must be a kernel start.

This module's top level stays cheap: the client imports it before anything else, and
what it needs only once its request is sent (signals) comes after: the template's launcher
is at work by then. `_socket`, not `socket`: that one's enum and selectors imports were a
third of the client's own start (11 ms).
"""
import _socket
import os
import sys

from . import preload

# A starting template's word to the client that started it (connect_or_start): it
# listens, or another template won the path's lock (wait for that one); else it failed,
# and says why after FAILED (or dies, and says nothing).
LISTENING, LOCKED, FAILED = b"L", b"O", b"E"
# On a kernel's request socket: from the requester (Launcher), a signal for the kernel, by
# number; to it, what the launch made (said once, at the hand-off: removed by the requester
# if the monitor then dies without a word), and the kernel's raw wait status, last.
SIGNAL, LEFT, STATUS = b"K", b"L", b"S"


def lock_path(path):
    """The lock file of the template at path: held by the one that serves there."""
    return path + ".lock"


def socket_path(environ=os.environ):
    """One template per user, interpreter, startup environment and ns_kernel install."""
    import zlib
    from .socketdir import default_base
    key = zlib.crc32(repr((sys.executable, sorted(preload.startup_env(environ).items()))).encode(),
                     _code_key())
    return os.path.join(default_base(environ), f"warm-{key:08x}.sock")


def _code_key():
    """The code this process runs, not file times (a reinstall of the same code keeps the
    template): read once per process (2.6 ms; the provisioner asks at every start).
    Not functools.lru_cache: importing functools is 4 ms of the client's start."""
    global _CODE_KEY
    if _CODE_KEY is None:
        import zlib
        here = os.path.dirname(os.path.abspath(__file__))
        _CODE_KEY = 0
        for name in sorted(os.listdir(here)):
            if name.endswith(".py"):
                with open(os.path.join(here, name), "rb") as f:
                    _CODE_KEY = zlib.crc32(f.read(), _CODE_KEY)
    return _CODE_KEY


_CODE_KEY = None


# -- the client ---------------------------------------------------------------------------

def client_main(start):
    """What Jupyter runs for a warm `start` (argv.KernelStart). Returns (or exits) like
    the kernel did; None if no template took the kernel (nothing was started: __main__
    starts it cold)."""
    from .errors import SetupError
    path = socket_path()
    try:
        sock = connect_or_start(path)
    except SetupError as exc:
        _cold(exc.line().removeprefix("ns-kernel: "))
        return None
    launcher = launch(sock, start.argv(), dict(os.environ), os.getcwd(), [0, 1, 2])
    if launcher is None:
        _cold(f"the template {path} started no launcher")
        return None
    from .pid import exit_like, forward_signals
    forward_signals(launcher.send_signal)
    launcher.wait()
    if launcher.status is None:
        print("ns-kernel: the warm kernel's launcher died", file=sys.stderr, flush=True)
        return 1
    exit_like(launcher.status)


def launch(sock, argv, env, cwd, stdio):
    """Hand a kernel start (its launcher's argv, environment, cwd and three stdio fds) to
    the template at the other end of sock; the Launcher it forked, or None if it forked
    none (it left meanwhile: retired, stopped)."""
    from array import array
    request = {"kind": "kernel", "argv": argv, "env": env, "cwd": cwd}
    try:
        sock.sendmsg([_encode(request).encode()],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array("i", stdio))])
        pid = int(sock.recv(64) or 0)
    except (OSError, ValueError):
        pid = 0
    if not pid:
        sock.close()
        return None
    return Launcher(sock, pid)


class Launcher:
    """A launcher the template forked for us, seen like a subprocess.Popen of it: by the
    warm client, and by the provisioner in the Jupyter server (its `process`), which then
    needs no client interpreter at all. Both talk to it over the request's socket, never
    to a pid: its status comes that way (it is the template's child, not ours), and so do
    signals, since once the kernel runs the launcher may hand it to the sandbox's monitor
    and leave (handoff.hand_off), and the socket, with what was said on it, goes
    along. `pid` stays the launcher's."""
    stdin = stdout = stderr = None      # Popen's pipes: LocalProvisioner.wait closes them

    def __init__(self, sock, pid):
        self.sock, self.pid = sock, pid
        self.status = None          # its kernel's raw wait status, once sent
        self.returncode = None      # as Popen's: the exit code, or minus the signal
        self.left = None            # what to remove if it dies without a word (LEFT)
        self._killed = False

    def poll(self):
        while self.returncode is None and self._ready(0):
            self._finish()
        return self.returncode

    def wait(self, timeout=None):
        while self.returncode is None:
            if not self._ready(timeout):
                import subprocess
                raise subprocess.TimeoutExpired(f"launcher {self.pid}", timeout)
            self._finish()
        return self.returncode

    def _ready(self, timeout):
        # poll, not select: a busy server's fds go past select's 1023 (jupyter_server
        # raises its limit to 4096).
        import select
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _finish(self):
        """Read what it says: what it made (once the monitor has the kernel), or how the
        kernel ended, or nothing: then it has gone."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if data.startswith(LEFT):
            self.left = self.left or data[1:]
            return
        if data.startswith(STATUS):
            self.status = int(data[1:])
            self.returncode = os.waitstatus_to_exitcode(self.status)
        else:
            # Gone without a word: killed (by us, or the OOM killer) or it crashed. The
            # monitor that took the kernel over (SIGKILLed, it removed nothing): what it
            # would have removed, nobody else knows of.
            import signal
            self.returncode = -signal.SIGKILL if self._killed else 1
            if self.left:
                from . import made
                made.remove(made.Made.loads(self.left), cgroup_beside=True)
        self.sock.close()

    def send_signal(self, signum):
        if self.returncode is None:
            import signal
            try:
                if signum == signal.SIGKILL:
                    # A SIGKILLed launcher could not remove what it made (a cgroup, in
                    # its first moments); closing our end has whoever holds the other
                    # kill its sandbox at once, clean up and exit (supervise.Abandoned);
                    # the socket's EOF says it has.
                    self._killed = True
                    self.sock.shutdown(_socket.SHUT_WR)
                else:
                    self.sock.send(SIGNAL + b"%d" % signum)
            except OSError:
                pass    # it has gone already: its status, or the EOF, is there to read

    def terminate(self):
        import signal
        self.send_signal(signal.SIGTERM)

    def kill(self):
        import signal
        self.send_signal(signal.SIGKILL)


def _cold(why):
    print(f"ns-kernel: warm start: {why}; this kernel starts cold", file=sys.stderr, flush=True)


def _connect(path):
    """A socket to the template at path; None if none listens; a SetupError if what
    listens is not one we may trust (another uid, or inside a sandbox), or if path is
    not one to connect to (a path too long for a Unix socket, a base we may not search)."""
    from .errors import SetupError
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:      # EACCES; a path too long for AF_UNIX (no errno): the base's
        sock.close()
        raise SetupError("warm", "connect", path, exc.errno or 0,
                         hint="" if exc.errno else str(exc)) from None
    why = untrusted(sock)
    if why:
        sock.close()
        raise SetupError("warm", "connect", path, hint=f"{why}: not our template")
    return sock


def untrusted(sock):
    """Why the process at the other end of sock is not one of ours on the host, or ''."""
    pid, uid, _ = _peer(sock)
    if uid != os.getuid():
        return f"the peer is uid {uid}, not {os.getuid()}"
    try:
        if os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            return ""
    except OSError:
        pass
    return f"the peer, pid {pid}, is not in the host's user namespace (a sandbox's?)"


def _encode(value):
    """JSON of the str, list and dict values a request holds, without the json module
    (which imports `re`: 4 ms of the warm client's start)."""
    from _json import encode_basestring_ascii as string
    if isinstance(value, str):
        return string(value)
    if isinstance(value, list):
        return "[" + ",".join(map(_encode, value)) + "]"
    return "{" + ",".join(f"{string(k)}:{_encode(v)}" for k, v in value.items()) + "}"


def connect(path):
    """A socket to this user's running template at path (socket_path), None if none
    listens; a SetupError if what listens cannot be trusted (nothing was sent)."""
    from .socketdir import ensure_base
    # Before connecting: a template in a dir another user made is theirs to fake.
    ensure_base(os.path.dirname(path))
    return _connect(path)


def connect_or_start(path=None, timeout=60.0):
    """A socket to this user's template (at path, default socket_path()), started if none
    listens; a SetupError if none can be trusted (nothing was sent to it)."""
    path = path or socket_path()
    sock = connect(path)
    if sock:
        return sock
    import select
    import time
    from .errors import SetupError
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    ready, told = os.pipe2(os.O_CLOEXEC)
    # The template daemonizes (its first fork); this child returns at once.
    try:
        child = preload.spawn("ns_kernel.template:template_main", [path, told], keep=told,
                              stdio=devnull)
    finally:
        os.close(devnull)
        os.close(told)
    os.waitpid(child, 0)
    deadline = time.monotonic() + timeout
    try:
        waiting = select.poll()     # not select(): a busy process's fds pass 1023
        waiting.register(ready, select.POLLIN)
        word = os.read(ready, 4096) if waiting.poll(timeout * 1000) else None
    finally:
        os.close(ready)
    if word is not None and (not word or word.startswith(FAILED)):
        why = word[1:].decode(errors="replace").splitlines()    # one line: the first
        why = "".join(c if c.isprintable() else "?" for c in why[0]) if why else ""
        raise SetupError("warm", "start the warm template", path,
                         hint=why or "it died as it started")
    # It listens; or another one holds the path's lock, and listens soon, unless it dies
    # first (then nobody holds the lock).
    while time.monotonic() < deadline:
        sock = _connect(path)
        if sock:
            return sock
        if word == LOCKED and not _locked(lock_path(path)):
            raise SetupError("warm", "start the warm template", path,
                             hint="the template that held its lock died before it listened")
        time.sleep(0.005)
    raise SetupError("warm", "start the warm template", path,
                     hint="it never listened; the cold start says what stops it")


def _locked(lock):
    """Whether a template holds the lock file at lock (template._listen): a shared lock
    taken and let go at once (a template that tries for it meanwhile leaves, as if it were
    held)."""
    import fcntl
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _peer(conn):
    """(pid, uid, gid) of the other end."""
    import struct
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def template_pid(path=None):
    """The pid of the running template (at path, default ours), None if none listens
    (tests, bench/)."""
    sock = _connect(path or socket_path())
    if sock is None:
        return None
    try:
        return _peer(sock)[0]
    finally:
        sock.close()


def stop(path=None):
    """Ask the running template (if any; default: this interpreter's, else the one at
    `path`) to exit; True if there was one."""
    sock = _connect(path or socket_path())
    if sock is None:
        return False
    try:
        sock.sendall(_encode({"kind": "stop"}).encode())
        sock.recv(1)
    except ConnectionResetError:    # it was leaving already (stopped, retired)
        pass
    finally:
        sock.close()
    return True


if __name__ == "__main__":
    from .errors import SetupError
    if sys.argv[1:] != ["stop"]:
        sys.exit("usage: python -m ns_kernel.warm stop")
    try:
        sys.exit(0 if stop() else 1)
    except SetupError as exc:       # not our template listening there
        sys.exit(exc.line())
