"""The warm template (warm.py says how a warm start goes and who may talk to whom): the
process that has imported ipykernel, serves each request from a fork of its own, forks the
kernel's monitor beside it, and retires when idle or when what it imported has changed.
"""
import os
import signal
import socket
import sys

from . import preload, titles
from .warm import FAILED, LISTENING, LOCKED, STATUS, lock_path, untrusted

IDLE_EXIT = 600.0
# How often an idle template looks whether what it imported has changed (2-10 ms each): a
# newer ns_kernel is a new template (warm.socket_path), and nobody asks this one again.
STALE_CHECK = 15.0
NEXT_PAIR_DELAY = 0.1
MAX_REQUEST = 1 << 20
MAX_HANDLES = 250     # bind sources a plan may have (SCM_RIGHTS takes at most 253 fds)
# What a request may ask, with the keys it has; a kernel's comes with the client's stdio.
KINDS = {"kernel": ({"kind", "argv", "env", "cwd"}, 3), "stop": ({"kind"}, 0)}
TAKEN = b"t"    # a forked pair's word that it has a request (to the template, the monitor)


def template_main():
    """`python -c ... PATH [READY]`: serve kernels on PATH; READY, an fd, hears how the
    start went (the client would otherwise wait its whole timeout for a template that
    has died: a venv without ipykernel)."""
    path = sys.argv[1]
    ready = int(sys.argv[2]) if len(sys.argv) > 2 else None    # a client of before READY
    if os.fork():
        os._exit(0)
    os.setsid()
    os.chdir("/")
    titles.template()
    import gc
    failed = preload.import_kernel_modules(("ns_kernel.cli", "ns_kernel.launcher"))
    if not failed and preload.threads() != 1:
        failed = f"{preload.threads()} threads after its imports"
    if not failed:
        _compile_defaults()         # before _sources: libseccomp is mapped from now on
        made_from = _sources()
        try:
            held = _listen(path)
        except OSError as exc:
            failed = str(exc)
    if failed:
        _tell(ready, FAILED + failed.encode(errors="replace"))
        sys.exit(1)
    if held is None:
        _tell(ready, LOCKED)
        sys.exit(0)
    _tell(ready, LISTENING)
    listener, lock, mine = held

    def leave(*_):
        # Whatever happens to the files: a template told to stop must stop, and at once
        # (unwinding an interpreter that imported ipykernel, atexit and zmq, is slow).
        try:
            # Unless a newer template has taken the path over already.
            if os.path.exists(path) and os.stat(path).st_ino == mine:
                os.unlink(path)
            os.unlink(lock_path(path))  # ours while we hold it (_listen)
        except OSError:
            pass
        finally:
            os._exit(0)

    # Children are reaped by the kernel; each forked child restores SIGCHLD first.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, leave)
    gc.freeze()        # the imports stay shared with every kernel: never touched again
    import select
    try:
        # Its children signal it through this, never as os.getppid(): once it has gone,
        # that is whoever adopted them (PID 1, systemd --user, a container's tini).
        me = os.pidfd_open(os.getpid())
        # The two forks a request needs are made before it comes (~4 ms each: a 45 MB
        # image's page tables), and again once a pair has taken one: at once if another
        # client waits, else once that start has had its first 100 ms (on two cores,
        # forking beside its launcher and its monitor's checks slowed all three).
        while True:
            taken = _fork_pair(listener, lock, made_from, me)
            if not _taken_in_time(taken, made_from):
                break
            os.close(taken)     # a byte (a request taken) or EOF (the pair is gone)
            select.select([listener], [], [], NEXT_PAIR_DELAY)
    finally:
        leave()


def _taken_in_time(taken, made_from):
    """Whether the pair takes a request (taken turns readable) before IDLE_EXIT seconds
    pass, and while what the template was made from is still what is installed."""
    import select
    idle = 0.0
    while idle < IDLE_EXIT:
        wait = min(STALE_CHECK, IDLE_EXIT - idle)
        if select.select([taken], [], [], wait)[0]:
            return True
        idle += wait
        if _stale(made_from):
            return False
    return False


def tell_at_exit(path):
    """In a Jupyter server whose kernels come from the template at path (the
    provisioner's): as the server exits (JupyterLab stopped), one line on what stays."""
    import atexit
    if path not in _TOLD:
        _TOLD.add(path)
        atexit.register(_lingers, path)


_TOLD = set()


def _lingers(path):
    from .errors import SetupError
    from .warm import template_pid
    try:
        pid = template_pid(path)
    except (OSError, SetupError):
        return      # not ours to speak of
    if pid:
        print(f"ns-kernel: the warm template of {sys.executable} (pid {pid} and the two spares "
              f"it keeps) stays for the next kernel, until {IDLE_EXIT / 60:g} minutes pass "
              f"without one or ns_kernel changes; `{sys.executable} -m ns_kernel.warm stop` "
              "ends it now", file=sys.stderr, flush=True)


def _listen(path):
    """(listener, lock, the socket's inode): this template's place at path; None if
    another template holds the path's lock. An OSError leaves no lock file of ours."""
    import fcntl
    # One template per path: clients that all found none start one each; the first to
    # lock serves, the others leave (the lock dies with its holder, the socket file not).
    # The holder removes the lock file as it leaves; so a lock won on a file that is no
    # longer at its path (removed meanwhile) is no lock: try the one there now.
    lock_file = lock_path(path)
    for _ in range(3):
        lock = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return None
        try:
            if os.stat(lock_file).st_ino == os.fstat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(lock)
    else:
        return None     # three templates left under it: let the next client try
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            os.unlink(path)    # a stale socket of a template that died
        except FileNotFoundError:
            pass
        listener.bind(path)
        listener.listen(64)
        return listener, lock, os.stat(path).st_ino
    except OSError:
        listener.close()
        try:
            os.unlink(lock_file)    # ours, as we hold it: a client waiting sees it free
        except OSError:
            pass
        raise


def _tell(ready, word):
    """Say word to the client that started this template, once (its pipe closes)."""
    if ready is None:
        return
    try:
        os.write(ready, word)
    except OSError:
        pass    # it has gone (killed meanwhile): nobody waits
    finally:
        os.close(ready)


def _compile_defaults():
    """What every kernel's start would compile from the default settings, compiled once
    here (cached where it is used, shared with every fork): the environment's patterns
    (each launcher) and the seccomp filter (each kernel)."""
    from . import seccomp
    from .config import ENV_ALLOW, ENV_DENY, ENV_KEEP
    from .plan import env_pattern
    for patterns in (ENV_ALLOW, ENV_DENY, ENV_KEEP):
        env_pattern(patterns)
    try:
        seccomp.program(seccomp.default_filter())
    except OSError:
        pass        # no libseccomp here: each kernel's start says so in its own words


def _fork_pair(listener, lock, made_from, template_fd):
    """Fork the pair that serves the next request: one accepts it and reads it; the
    other, the monitor of the sandbox it may ask for (or it leaves). Returns a pipe that
    becomes readable once the request is taken. Until then both die with the template
    (PR_SET_PDEATHSIG on the one waiting in accept; the monitor sees its socket close).
    template_fd: a pidfd of the template, for a stop request or a retirement."""
    from .syscalls import PR_SET_PDEATHSIG, prctl
    from .cgroup import hierarchies
    asks, waits = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    template = os.getpid()
    # The monitor's cgroups now: its launcher moves it early (Enforcement.attach_soon).
    origin = hierarchies()
    spare = os.fork()
    if spare == 0:
        _leave_template(listener, lock, asks, taken_r, taken_w)
        _child(_spare_monitor, waits, made_from, origin, template_fd)

    def server():
        _leave_template(lock, waits, taken_r)
        titles.spare("launcher")
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != template:        # it left before that took effect
            return
        conn = _accept(listener)
        prctl(PR_SET_PDEATHSIG, 0)          # this kernel outlives the template
        listener.close()
        os.write(taken_w, TAKEN)
        os.close(taken_w)
        _serve(conn, asks, spare, template_fd)
    if os.fork() == 0:
        _child(server)
    for sock in (asks, waits):
        sock.close()
    os.close(taken_w)
    return taken_r


def _child(step, *args):
    """Run step(*args) in a forked child and exit: whatever happens, never return into the
    template's loop."""
    try:
        step(*args)
    except BaseException:   # noqa: BLE001 - said, then gone
        import traceback
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _accept(listener):
    """The next connection from a client we trust (warm.py: who may talk to whom)."""
    while True:
        conn, _ = listener.accept()
        if not untrusted(conn):
            return conn
        conn.close()


def _sources():
    """What the template was made from, as {path: (inode, size, mtime)}: the interpreter,
    every file its imports loaded, each shared library it mapped (a libc or libpython
    upgrade must retire it too), and each sys.path dir (a pip install or uninstall changes its
    listing, hence its mtime, even for a package the template did not import: a .pth file
    of it runs at every interpreter's start)."""
    paths = {os.path.realpath(sys.executable), *filter(None, sys.path)}
    paths.update(filter(None, (getattr(module, "__file__", None)
                               for module in list(sys.modules.values()))))
    made_from = {path: _stat(path) for path in paths}
    for mapped in _mapped_libraries():
        path = mapped.removesuffix(" (deleted)")
        # Replaced while the template started: stale at its first request.
        made_from[path] = _stat(path) if path == mapped else "replaced"
    return made_from


def _mapped_libraries():
    """The shared libraries this process maps executable, as /proc/self/maps names them."""
    import re
    library = re.compile(r"\.so(\.\d+)*( \(deleted\))?$")
    libraries = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(None, 5)
            if len(fields) == 6 and "x" in fields[1] and library.search(fields[5]):
                libraries.add(fields[5])
    return libraries


def _stat(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _stale(made_from):
    """A file of made_from that is no longer what the template imported, or ''."""
    return next((path for path, seen in made_from.items() if _stat(path) != seen), "")


def _leave_template(*held):
    """A forked child's first step: close what it holds of the template's and does not
    need (sockets, fds), and restore the signals the template handles."""
    for item in held:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dumps(plan):
    """A plan, from a request's launcher to its spare monitor: two forks of the template
    over a socketpair the template made, which nobody else holds (not a request)."""
    import pickle
    return pickle.dumps(plan)


def _serve(conn, monitor, spare, template_fd):
    """In a fresh fork of the template: read the one request and act on it. monitor: a
    socket to the spare monitor forked beside this process (_spare_monitor), spare: its
    pid; template_fd: a pidfd of the template."""
    try:
        monitor.sendall(TAKEN)
        conn.settimeout(30)     # a client that connects and says nothing
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 4)
        conn.settimeout(None)
        request = _request(data, fds)
        if request is None:
            return
        if request["kind"] == "stop":
            _stop_template(template_fd)
        else:
            os.close(template_fd)
            _launcher_child(conn, request, fds, monitor, spare)
    finally:
        os._exit(0)


def _request(data, fds):
    """The request in data, if it is one of KINDS with all it must have; else None."""
    import json
    from .argv import kernel_start
    try:
        request = json.loads(data)
        keys, nfds = KINDS[request["kind"]]
    except (ValueError, TypeError, KeyError):
        return None
    if set(request) != keys or len(fds) != nfds:
        return None
    if request["kind"] == "stop":
        return request
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if not (isinstance(argv, list) and isinstance(env, dict) and isinstance(cwd, str)
            and all(isinstance(item, str) for item in (*argv, *env, *env.values()))):
        return None
    # The launcher of a kernel, nothing else that cli.main could run (install, run).
    request["start"] = kernel_start(argv)
    return request if request["start"] else None


def _take_stdio(fds):
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)


def _launcher_child(conn, request, fds, monitor, spare):
    """Become `python -m ns_kernel ARGV` for the client, from its environment and cwd."""
    import functools
    from . import cli
    from .launcher import Warm, kernel_id_from
    connection_file = request["start"].connection_file
    titles.launcher(connection_file, kernel_id_from(connection_file))
    _take_stdio(fds)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    conn.sendall(str(os.getpid()).encode())
    finish = functools.partial(_finish, conn)
    spawn = functools.partial(_spawn_monitor, monitor)
    # The connection's other end is what Jupyter kills (the client: a restart, a shutdown
    # now) or closes (the provisioner's warm.Launcher.kill): the launcher watches it and,
    # once closed, removes what it made and leaves (supervise.Abandoned, which _serve's
    # exit ends silently), whenever that happens, even while the sandbox is being built.
    # Once the kernel runs, the monitor may take all that over (_take_over).
    code = cli.start_kernel(request["start"], warm=Warm(spawn, conn.fileno(), spare),
                            finish=finish)
    finish((code or 0) << 8)


def _finish(conn, status):
    """Tell the requester how the kernel ended (warm.Launcher), and leave."""
    try:
        conn.sendall(STATUS + b"%d" % status)
    except OSError:
        pass    # the requester is gone (the server died): nobody to tell
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _take_over(ctl, init, origin, header, fds):
    """In the monitor, when its launcher hands it the running kernel (handoff.hand_off):
    leave the kernel's cgroup (this process's work is not the kernel's to pay for, and
    the cgroup is removed at the end), then live the rest of the launcher's life."""
    import functools
    from . import handoff, limits
    from .errors import one_line
    from .supervise import Abandoned, live_on
    try:
        sup = handoff.taken_over(ctl, init, header, fds)
    except Exception as exc:  # noqa: BLE001 - said; the caller removes the sandbox
        print(f"ns-kernel: warm start: take the kernel over from its launcher: {exc}",
              file=sys.stderr, flush=True)
        return
    limits.leave_cgroup(origin, remove=False)
    finish = functools.partial(_finish, socket.socket(fileno=sup.requester))
    try:
        code = one_line(live_on, sup, finish)
        finish((code or 0) << 8)
    except Abandoned:
        pass        # silently, as the launcher it took over from would have
    os._exit(0)


def _spawn_monitor(monitor, plan, ctl, err_w, handles, stdio, fresh=False):
    """Sandbox.start's spawn: hand the plan to the spare monitor; returns its pid. fresh:
    the kernel execs a fresh interpreter (KernelApp.prestart off in a config file)."""
    socket.send_fds(monitor, [_dumps((plan, fresh))], [ctl.fileno(), err_w, *stdio, *handles])
    pid = monitor.recv(64)
    if not pid:
        from .errors import SetupError
        raise SetupError("warm", "the warm template's spare monitor exited")
    return int(pid)


def _spare_monitor(sock, made_from, origin, template_fd):
    """Forked by the template beside each request: becomes the monitor of the sandbox the
    request's launcher asks for; leaves if it asks for none (the socket closes). While the
    launcher reads the config, it checks that the template's sources are unchanged (2-10
    ms, off the start's path): if one changed (a `pip install -U`), the template exits and
    this kernel execs a fresh interpreter, which imports what is installed now."""
    import functools
    import pickle
    from . import forked, sandbox
    titles.spare("monitor")
    try:
        if sock.recv(1) != TAKEN:      # made before the request: check what is there now
            os._exit(0)
    except OSError:
        os._exit(0)
    stale = _stale(made_from)
    if stale:       # the next client starts a new one, from what is installed now
        _stop_template(template_fd)
    os.close(template_fd)
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 5 + MAX_HANDLES)
    except OSError:
        os._exit(0)
    if not data or len(fds) < 5:
        os._exit(0)
    plan, fresh = pickle.loads(data)
    ctl_fd, err_w, *stdio = fds[:5]
    handles = tuple(fds[5:])
    _take_stdio(stdio)
    if stale:      # to the server's log, as the kernel's own lines
        print(f"ns-kernel: warm template retired: {stale} changed since it started; this "
              "kernel execs a fresh interpreter", file=sys.stderr, flush=True)
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
    kernel_step = forked.exec_kernel if stale or fresh else preload.run_preloaded
    forked.run(functools.partial(sandbox.monitor, kernel_step=kernel_step, handles=handles,
                                 origin=origin, take_over=_take_over), plan, ctl, err_w)


def _stop_template(template_fd):
    """SIGTERM the template through the pidfd it opened of itself: if it has gone
    already, nobody (never whoever adopted its children since)."""
    try:
        signal.pidfd_send_signal(template_fd, signal.SIGTERM)
    except ProcessLookupError:
        pass


