"""Apply a Plan: the only place that knows the order of the setup steps.

Three processes, as in nsjail and bubblewrap:
  monitor   forked by the launcher; new user namespace; stays in the host's mount
            namespace so it can remove the socket dir if the launcher is SIGKILLed
  init      PID 1 of the new PID namespace; builds mounts, hostname, network; then reaps
  kernel    PID 2; execs ipykernel as the plan's uid with no capabilities

A failure before exec sends a SetupError record up the error pipe and exits 127;
the launcher prints it. A kernel never starts in a half-built sandbox.
"""
import functools
import gc
import os
import select
import selectors
import signal
import socket
import traceback

from . import limits, mount, net, pid, socketdir
from .errors import SetupError
from .syscalls import CloneFlags, drop_all_capabilities, set_no_new_privs, \
    set_parent_death_signal, sethostname, unshare
from .user import userns_hint, write_id_maps

MSG_UNSHARED = b"U"
MSG_MAPPED = b"M"
MSG_STATUS = b"S"


class Sandbox:
    """The launcher's handle on a running sandbox."""

    def __init__(self, plan, attach=None):
        self.plan = plan
        self.attach = attach       # puts the monitor in the kernel's cgroup (limits.py)
        self.pid = None            # the monitor's pid
        self.ctl = None            # launcher's end of the control socket
        self.errors = None         # read end of the error pipe
        self.kernel_status = None  # raw wait status of the kernel, once reported
        self.status = None         # the monitor's wait status, once waited for
        self._error_data = b""

    def start(self, spawn=None):
        """Start the monitor, map its ids, and return; the rest happens in the children.
        The monitor is forked here, or by spawn(plan, ctl, err_w) -> pid: a warm template
        that has ipykernel imported already runs the same steps (warm.py)."""
        ctl, ctl_child = socket.socketpair()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if spawn:
            try:
                child = spawn(self.plan, ctl_child, err_w)
            except BaseException:
                ctl.close()
                os.close(err_r)
                raise
            finally:
                ctl_child.close()
                os.close(err_w)
        else:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, pid.FORWARDED)
            child = os.fork()
            if child == 0:
                ctl.close()
                os.close(err_r)
                _run_child(_monitor, self.plan, ctl_child, err_w)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            ctl_child.close()
            os.close(err_w)
        self.pid, self.ctl, self.errors = child, ctl, err_r
        try:
            if ctl.recv(1) != MSG_UNSHARED:
                raise self.failure() or SetupError("user", "sandbox monitor exited early")
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
        while not self.read_errors():
            pass
        return SetupError.from_json(self._error_data) if self._error_data else None

    def read_status(self):
        """Collect the kernel's wait status that init sends just before it exits."""
        data = self.ctl.recv(64)
        if data.startswith(MSG_STATUS):
            self.kernel_status = int(data[1:])
        return data

    def signal(self, signum):
        try:
            os.kill(self.pid, signum)
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
            status = _wait_foreign(self.pid)
        self.pid, self.status = None, status
        return status


def _wait_foreign(pid_):
    """Wait for a process that is not our child; its status as if it had been killed."""
    try:
        pidfd = os.pidfd_open(pid_)
    except ProcessLookupError:
        return signal.SIGKILL
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)
    return signal.SIGKILL


def _run_child(step, plan, ctl, err_w):
    """Run one child's steps; any failure goes up the error pipe, then exit 127."""
    try:
        # What the parent allocated stays shared: the collector must not write to it.
        gc.freeze()
        pid.reset_signals()
        step(plan, ctl, err_w)
    except BaseException as exc:  # noqa: BLE001 - a child must never return into the launcher
        if os.environ.get("NS_KERNEL_DEBUG"):
            traceback.print_exc()
        if isinstance(exc, OSError):
            exc = SetupError("sandbox", "sandbox setup", exc.filename or "", exc.errno)
        elif not isinstance(exc, SetupError):
            exc = SetupError("sandbox", f"sandbox setup: {exc!r}")
        _report(err_w, exc)
    os._exit(127)


def _report(err_w, exc):
    try:
        os.write(err_w, exc.to_json().encode())
    except OSError:
        pass


def _monitor(plan, ctl, err_w, kernel_step=None):
    """kernel_step(plan, ctl, err_w): the kernel's last step, _exec_kernel by default."""
    # Out of the launcher's process group: Jupyter's killpg(SIGINT) reaches the launcher
    # alone, which forwards it exactly once; and no controlling terminal (TIOCSTI).
    os.setsid()
    if plan.drop_groups:
        os.setgroups([])
    try:
        # Alone and first (runc): the other namespaces must be owned by the new user ns.
        unshare(CloneFlags.CLONE_NEWUSER)
    except OSError as exc:
        raise SetupError("user", "unshare(CLONE_NEWUSER)", "", exc.errno, userns_hint()) from None
    # Where the launcher moves us next is its kernel cgroup; remember where we came from.
    origin = limits.cgroup_origin(plan.limits)
    ctl.sendall(MSG_UNSHARED)
    if ctl.recv(1) != MSG_MAPPED:
        os._exit(127)   # the launcher failed to map us and reports why itself
    try:
        unshare(CloneFlags.CLONE_NEWPID)
    except OSError as exc:
        raise SetupError("pid", "unshare(CLONE_NEWPID)", "", exc.errno) from None
    init = os.fork()
    if init == 0:
        _run_child(functools.partial(_init, kernel_step=kernel_step or _exec_kernel),
                   plan, ctl, err_w)
    os.close(err_w)
    pid.forward_signals(init)
    _supervise(plan, ctl, init, origin)


def _supervise(plan, ctl, init, origin):
    """Wait for init; if the launcher dies first (the control socket closes), kill the
    sandbox and remove its socket dir and cgroup, which nobody else would."""
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    pidfd = os.pidfd_open(init)
    sel.register(pidfd, selectors.EVENT_READ)
    while True:
        ready = [key.fileobj for key, _ in sel.select()]
        if pidfd in ready:
            break
        if ctl in ready and not ctl.recv(1):
            os.kill(init, signal.SIGKILL)
            os.waitpid(init, 0)
            socketdir.remove(plan.socket_dir)
            limits.leave_cgroup(origin)
            os._exit(137)
    _, status = os.waitpid(init, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _init(plan, ctl, err_w, kernel_step):
    # If the monitor dies, init dies, and with it every process of the PID namespace.
    set_parent_death_signal(signal.SIGKILL)
    flags = CloneFlags.CLONE_NEWNS | CloneFlags.CLONE_NEWIPC | CloneFlags.CLONE_NEWUTS
    if plan.network != "host":
        flags |= CloneFlags.CLONE_NEWNET
    try:
        unshare(flags)
    except OSError as exc:
        raise SetupError("unshare", f"unshare({flags!s})".replace("CloneFlags.", ""), "",
                         exc.errno) from None
    trees = mount.grab_bind_sources(plan.mounts)
    # Become the plan's uid now: files made in the new mounts need an owner that is mapped
    # (host root is not), and capabilities stay, since uid 0 has no mapping to leave.
    try:
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    except OSError as exc:
        raise SetupError("user", f"setresuid({plan.uid})", "", exc.errno) from None
    # A change of uid clears the parent-death signal (prctl(2)): root's sandbox, whose
    # monitor is killed directly (Sandbox.kill), would leave init and the kernel running.
    set_parent_death_signal(signal.SIGKILL)
    try:
        sethostname(plan.hostname)
    except OSError as exc:
        raise SetupError("uts", "sethostname", plan.hostname, exc.errno) from None
    mount.enter_new_root(plan.mounts, trees, plan.cwd)
    if plan.network == "loopback":
        net.bring_up_loopback()
    limits.apply_rlimits(plan.limits)
    set_no_new_privs()
    drop_all_capabilities()
    kernel = os.fork()
    if kernel == 0:
        _run_child(kernel_step, plan, ctl, err_w)
    os.close(err_w)
    pid.run_init(kernel, lambda status: ctl.sendall(MSG_STATUS + str(status).encode()))


def enter_kernel_session(ctl, err_w):
    """The kernel's first step, whether it execs or runs preloaded (warm.py)."""
    # Its own session and process group: the init forwards an interrupt to the group, so
    # the kernel's subprocesses get it as they would under a plain kernel.
    os.setsid()
    ctl.close()
    os.closerange(3, err_w)
    os.closerange(err_w + 1, 65536)


def _exec_kernel(plan, ctl, err_w):
    enter_kernel_session(ctl, err_w)
    try:
        os.execve(plan.argv[0], plan.argv, dict(plan.env))
    except OSError as exc:
        hint = ""
        if exc.errno == 13:
            hint = (f"the sandbox runs as uid {plan.uid}, which cannot reach this interpreter; "
                    "install the kernel's Python where every user can read it (e.g. a venv made "
                    "from /usr/bin/python3)")
        raise SetupError("exec", "execve", plan.argv[0], exc.errno, hint) from None
