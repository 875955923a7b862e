"""Apply a Plan: the only place that knows the order of the setup steps.

Three processes, as in nsjail and bubblewrap:
  monitor   forked by the launcher; new user namespace; stays in the host's mount
            namespace so it can remove the socket dir if the launcher is SIGKILLed
  init      PID 1 of the new PID namespace; builds mounts, hostname, network; then reaps
  kernel    PID 2; execs ipykernel as the plan's uid with no capabilities, or is the
            kernel's prestarted interpreter, which joins init's namespaces (prestart.py)

A failure before exec sends a SetupError record up the error pipe and exits 127;
the launcher prints it. A kernel never starts in a half-built sandbox.
"""
import functools
import json
import os
import select
import selectors
import signal
import socket

from . import forked, leftovers, limits, mount, net, pid, prestart, seal, socketdir, titles, user
from .errors import SetupError
from .mount import RO_TOP
from .plan import SOCKET_DIR_INSIDE
from .syscalls import IN_CREATE, IN_MOVED_TO, CloneFlags, drop_all_capabilities, \
    drop_supplementary_groups, inotify_watch, mount_setattr, set_dumpable, \
    set_parent_death_signal, set_process_title, sethostname, unshare
from .user import userns_hint, write_id_maps

MSG_UNSHARED = b"U"
MSG_MAPPED = b"M"
MSG_STATUS = b"S"
MSG_PROXY = b"P"       # with init's proxy listener (network 'proxy')
MSG_HANDOFF = b"H"     # the launcher leaves, the monitor takes over (handoff.hand_off)
MAX_HANDED_FDS = 8


class Sandbox:
    """The launcher's handle on a running sandbox."""

    def __init__(self, plan, attach=None, prestarted=None, handles=(), stdio=(0, 1, 2)):
        self.plan = plan
        self.handles = handles     # of the bind sources, in order (mount.open_sources)
        self.stdio = stdio         # the sandbox's fds 0, 1, 2 (the launcher's /dev/null and pipe)
        self.attach = attach       # puts the monitor in the kernel's cgroup (limits.py)
        self.prestarted = prestarted   # the kernel's interpreter, if spawned (prestart.py)
        self.pid = None            # the monitor's pid
        self.pidfd = None          # and a pidfd of it, opened while it surely lives
        self.ctl = None            # launcher's end of the control socket
        self.errors = None         # read end of the error pipe
        self.kernel_status = None  # raw wait status of the kernel, once reported
        self.status = None         # the monitor's wait status, once waited for
        self.leftovers = [], 0     # (paths, how many more), once reported
        self.proxy_listener = None # the socket init listens on for the proxy, once sent
        self._error_data = b""
        self._status_data = b""

    @classmethod
    def adopted(cls, pid_, ctl):
        """The handle of a monitor that took its sandbox over (handoff.taken_over): init,
        its child, is the process to watch; ctl, the launcher's end of the control socket."""
        box = cls(None)
        box.pid, box.pidfd, box.ctl = pid_, os.pidfd_open(pid_), ctl
        return box

    def start(self, spawn=None):
        """Start the monitor, map its ids, and return; the rest happens in the children.
        The monitor is forked here, or by spawn(plan, ctl, err_w, handles, stdio) -> pid: a warm template
        that has ipykernel imported already runs the same steps (warm.py)."""
        ctl, ctl_child = socket.socketpair()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if spawn:
            try:
                child = spawn(self.plan, ctl_child, err_w, self.handles, self.stdio)
            except BaseException:
                ctl.close()
                os.close(err_r)
                raise
            finally:
                ctl_child.close()
                os.close(err_w)
        else:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, pid.FORWARDED)
            prestarted = self.prestarted and self.prestarted.sock
            child = os.fork()
            if child == 0:
                ctl.close()
                os.close(err_r)
                for target, fd in enumerate(self.stdio):
                    os.dup2(fd, target)
                forked.run(functools.partial(monitor, prestarted=prestarted,
                                             handles=self.handles),
                           self.plan, ctl_child, err_w)
            if self.prestarted:
                self.prestarted.release()   # init has it now
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            ctl_child.close()
            os.close(err_w)
        self.pid, self.ctl, self.errors = child, ctl, err_r
        try:
            if ctl.recv(1) != MSG_UNSHARED:
                raise self.failure() or SetupError("user", "sandbox monitor exited early")
            # It waits for MSG_MAPPED, alive: from here on it is known by this handle, not
            # by its pid (a warm one is the template's child, reaped by nobody we know:
            # its pid may go to another process).
            self.pidfd = os.pidfd_open(child)
            # The monitor waits for its id maps and has forked nothing yet: whatever the
            # sandbox forks from now on is born in the cgroup.
            if self.attach:
                self.attach(child)
            write_id_maps(child, self.plan)
            ctl.sendall(MSG_MAPPED)
        except BaseException:
            self.kill()
            raise
        return self

    def read_errors(self):
        """Read what the error pipe holds; True once it is closed (every child exec'd or
        exited)."""
        chunk = os.read(self.errors, 65536)
        self._error_data += chunk
        return not chunk

    def failure(self):
        """The SetupError a child reported, if any (blocks until the error pipe closes)."""
        while self.errors is not None and not self.read_errors():
            pass
        return SetupError.from_json(self._error_data) if self._error_data else None

    def read_status(self):
        """Collect what init sends: its proxy listener (network 'proxy'), and just before it
        exits the kernel's wait status and what it left where nothing is kept (leftovers.py)."""
        data, fds, _, _ = socket.recv_fds(self.ctl, 65536, 1)
        if fds:
            # Its byte ends this read (the kernel stops a read at passed fds).
            self.proxy_listener = socket.socket(fileno=fds[0])
            self._status_data += data.removesuffix(MSG_PROXY)
        else:
            self._status_data += data
        if self._status_data.startswith(MSG_STATUS) and self._status_data.endswith(b"\n"):
            report = json.loads(self._status_data[1:])
            self.kernel_status = report["status"]
            self.leftovers = report["left"], report["more"]
        return data

    def signal(self, signum):
        if self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def kill(self):
        """Kill the whole sandbox (its PID namespace dies with init) and reap the monitor."""
        self.signal(signal.SIGKILL)
        return self.wait()

    def wait(self):
        if self.pid is None:
            return self.status
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            # A warm template's monitor is its child, not ours: wait for it to go; what
            # the kernel's status was, init has sent on the control socket.
            if self.pidfd is not None:
                select.select([self.pidfd], [], [])
            status = signal.SIGKILL
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.pid, self.pidfd, self.status = None, None, status
        return status


def monitor(plan, ctl, err_w, kernel_step=None, prestarted=None, handles=(), origin=None,
             take_over=None):
    """The monitor's whole life, in the process forked to be it: by Sandbox.start, or a
    warm template's spare monitor (template.py). kernel_step(plan, ctl, err_w): the kernel's last step, forked.exec_kernel by default;
    prestarted: the socket to the kernel's prestarted interpreter (prestart.py); handles:
    of the bind sources (mount.open_sources); origin: our cgroups before the launcher may
    have moved us (a warm template's spare monitor, moved early: cgroup.hierarchies());
    take_over(ctl, init, origin, header, fds): how to take the launcher's place when it
    hands the kernel over (a warm template's spare; never returns)."""
    titles.monitor(plan)
    # Out of the launcher's process group: Jupyter's killpg(SIGINT) reaches the launcher
    # alone, which forwards it exactly once; and no controlling terminal (TIOCSTI).
    os.setsid()
    if plan.drop_groups:
        drop_supplementary_groups()
    try:
        # Alone and first (runc): the other namespaces must be owned by the new user ns.
        unshare(CloneFlags.CLONE_NEWUSER)
    except OSError as exc:
        raise SetupError("user", "unshare(CLONE_NEWUSER)", "", exc.errno, userns_hint()) from None
    # Where the launcher moves us next is its kernel cgroup; remember where we came from.
    origin = limits.cgroup_origin(plan.limits, origin)
    ctl.sendall(MSG_UNSHARED)
    if ctl.recv(1) != MSG_MAPPED:
        os._exit(127)   # the launcher failed to map us and reports why itself
    try:
        unshare(CloneFlags.CLONE_NEWPID)
    except OSError as exc:
        raise SetupError("pid", "unshare(CLONE_NEWPID)", "", exc.errno) from None
    init = os.fork()
    if init == 0:
        forked.run(functools.partial(_init, kernel_step=kernel_step or forked.exec_kernel,
                                     prestarted=prestarted, handles=handles), plan, ctl, err_w)
    os.close(err_w)
    if prestarted:
        prestarted.close()
    mount.close_all(handles)
    pid.forward_signals(init)
    _supervise(plan, ctl, init, origin, take_over)


def _supervise(plan, ctl, init, origin, take_over=None):
    """Wait for init; if the launcher dies first (the control socket closes), kill the
    sandbox and remove its socket dir and cgroup, which nobody else would. If it hands
    the kernel over instead, take_over."""
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    pidfd = os.pidfd_open(init)
    sel.register(pidfd, selectors.EVENT_READ)
    while True:
        ready = [key.fileobj for key, _ in sel.select()]
        # The launcher first: a hand-off that came as init exited (the kernel died as it
        # started) is the kernel's life to end, with init's status and the cleanup.
        if ctl not in ready:
            break
        said, fds, _, _ = socket.recv_fds(ctl, 1 + 8, MAX_HANDED_FDS)
        if said[:1] == MSG_HANDOFF and take_over and len(fds) >= 3:
            sel.close()
            os.close(pidfd)
            # Returns only if it could not: the launcher has gone all the same.
            take_over(ctl, init, origin, said[1:], fds)
            said = b""
        else:
            mount.close_all(fds)
        if not said:
            os.kill(init, signal.SIGKILL)
            os.waitpid(init, 0)
            socketdir.remove(plan.socket_dir)
            limits.leave_cgroup(origin)
            os._exit(137)
    _, status = os.waitpid(init, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _init(plan, ctl, err_w, kernel_step, prestarted, handles):
    # If the monitor dies, init dies, and with it every process of the PID namespace.
    set_parent_death_signal(signal.SIGKILL)
    # A cgroup namespace too: init is in the kernel's cgroup already (Sandbox.start), which
    # becomes its root, so the kernel does not learn the host's cgroup layout.
    flags = (CloneFlags.CLONE_NEWNS | CloneFlags.CLONE_NEWIPC | CloneFlags.CLONE_NEWUTS
             | CloneFlags.CLONE_NEWCGROUP)
    network = net.MODES[plan.network]
    if network.new_netns:
        flags |= CloneFlags.CLONE_NEWNET
    try:
        unshare(flags)
    except OSError as exc:
        raise SetupError("unshare", f"unshare({flags!s})".replace("CloneFlags.", ""), "",
                         exc.errno) from None
    trees = mount.grab_bind_sources(plan.mounts, handles)
    mount.close_all(handles)
    # Become the plan's uid now: files made in the new mounts need an owner that is mapped
    # (host root is not).
    forked.take_ids(plan)
    # A change of uid clears the parent-death signal (prctl(2)): root's sandbox, whose
    # monitor is killed directly (Sandbox.kill), would leave init and the kernel running.
    set_parent_death_signal(signal.SIGKILL)
    try:
        sethostname(plan.hostname)
    except OSError as exc:
        raise SetupError("uts", "sethostname", plan.hostname, exc.errno) from None
    mount.enter_new_root(plan.mounts, trees, plan.cwd)
    # On sys.path from the start: Python skips (and caches as such) a missing entry, and a
    # package the first `%pip install` puts there would not import until a restart.
    for path in plan.package_paths:
        mount.makedirs(path)
    if network.loopback_up:
        net.bring_up_loopback()
    if network.proxy:
        # Made here, in the kernel's namespace, and handed up: the launcher serves it from
        # the host's side (proxy.py). Before the kernel runs: the port is never the kernel's.
        with net.proxy_listener() as listener:
            socket.send_fds(ctl, [MSG_PROXY], [listener.fileno()])
    user.set_namespace_limits(plan.allow_userns)
    kernel = prestart.hand_off(prestarted, plan, err_w) if prestarted else None
    if kernel is None:
        kernel = os.fork()
        if kernel == 0:
            forked.run(functools.partial(_kernel, kernel_step), plan, ctl, err_w)
    # Init is a fork of the launcher (or of a warm template): its command line would show
    # the kernel the host's paths (the connection file's, the socket dir's). Not before
    # the fork: a kernel forked from init (warm) would inherit the title.
    set_process_title("ns-kernel-init")
    # Init keeps its capabilities a little longer (seal_socket_dir): the kernel, same uid,
    # must not be able to borrow them through ptrace or /proc/1/mem meanwhile.
    set_dumpable(False)
    pid.forward_signals(-kernel)
    seal_socket_dir(plan.sockets, kernel)
    drop_all_capabilities()
    os.close(err_w)
    pid.run_init(kernel, functools.partial(_report_end, plan, ctl))


def _kernel(kernel_step, plan, ctl, err_w):
    seal.seal(plan)
    kernel_step(plan, ctl, err_w)


def seal_socket_dir(sockets, kernel):
    """Once the kernel has bound its sockets, make the socket dir read-only for it: the
    host side connects to those paths (the bridge, the provisioner's client), so the
    kernel must not replace one by a link to a host socket, nor fill the host's disk
    there. Before that moment it has run none of the notebook's code."""
    if sockets:     # else `ns-kernel run`'s command, which binds none: read-only at once
        watch = inotify_watch(SOCKET_DIR_INSIDE, IN_CREATE | IN_MOVED_TO)
        exited = os.pidfd_open(kernel)
        try:
            while not all(_is_socket(f"{SOCKET_DIR_INSIDE}/{name}") for name in sockets):
                if exited in select.select([watch, exited], [], [])[0]:
                    return      # it died first: init reaps it and leaves
                _drain(watch)
        finally:
            os.close(watch)
            os.close(exited)
        for name in sockets:
            _open_to_owner_of_dir(f"{SOCKET_DIR_INSIDE}/{name}")
    try:
        mount_setattr(SOCKET_DIR_INSIDE, RO_TOP, recursive=False)
    except OSError as exc:
        raise SetupError("mount", f"mount_setattr({SOCKET_DIR_INSIDE}, read-only)",
                         SOCKET_DIR_INSIDE, exc.errno) from None


def _open_to_owner_of_dir(path):
    """Let the socket dir's owner connect to the kernel's socket at `path`: for root's
    kernels that is the host's root (socketdir.create), which a container may have left
    without CAP_DAC_OVERRIDE; only the dir guards the socket. By an O_PATH handle, and
    only a socket: the kernel could have swapped it for a link meanwhile."""
    import stat
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", 0o666)
    finally:
        os.close(fd)


def _is_socket(path):
    import stat
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_end(plan, ctl, status):
    """Init's last words, once the kernel has ended: its status, and what it left where
    nothing is kept."""
    left, more = leftovers.scan(plan.discarded, [m.dest for m in plan.mounts])
    report = {"status": status, "left": left, "more": more}
    ctl.sendall(MSG_STATUS + json.dumps(report).encode() + b"\n")
