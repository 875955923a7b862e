"""What every process the sandbox forks shares, whoever forks it (the launcher, init, the
warm template, the prestarted interpreter): failures go up the error pipe as one
SetupError record; and the kernel's own last steps.

Kept apart from sandbox.py so that a prestarted interpreter, whose every import delays
its kernel, loads only this.
"""
import gc
import os
import traceback

from . import pid
from .errors import SetupError


def run(step, plan, ctl, err_w):
    """Run one child's steps; any failure goes up the error pipe, then exit 127."""
    try:
        # What the parent allocated stays shared: the collector must not write to it.
        gc.freeze()
        pid.reset_signals()
        step(plan, ctl, err_w)
    except BaseException as exc:  # noqa: BLE001 - a child must never return into the launcher
        if os.environ.get("NS_KERNEL_DEBUG"):
            traceback.print_exc()
        report(err_w, SetupError.from_exception(exc, "sandbox", "sandbox setup"))
    os._exit(127)


def report(err_w, exc):
    try:
        os.write(err_w, exc.to_json().encode())
    except OSError:
        pass


def take_ids(plan):
    """setresgid/setresuid to the plan's ids, inside its user namespace. Capabilities
    stay (uid 0 has no mapping there to leave): the last steps still need them."""
    try:
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    except OSError as exc:
        raise SetupError("user", f"setresuid({plan.uid})", "", exc.errno) from None


def enter_kernel_session(plan, ctl, err_w):
    """The kernel's first step, whether it execs or runs preloaded (preload.py)."""
    # Its own session and process group: the init forwards an interrupt to the group, so
    # the kernel's subprocesses get it as they would under a plain kernel.
    os.setsid()
    if plan.sockets:
        # A kernel (not a command of `ns-kernel run`) starts with interrupts ignored, as
        # ipykernel's own start sets them (IPKernelApp.init_signal) and each cell then
        # handles them: one Jupyter sends while the kernel starts (every restart's first
        # step) has nothing to interrupt, and would make it exit 1 instead.
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl.close()
    os.closerange(3, err_w)
    os.closerange(err_w + 1, 65536)


def exec_kernel(plan, ctl, err_w):
    enter_kernel_session(plan, ctl, err_w)
    try:
        os.execve(plan.argv[0], plan.argv, dict(plan.env))
    except OSError as exc:
        hint = ""
        if exc.errno == 13:
            hint = (f"the sandbox runs as uid {plan.uid}, which cannot reach this interpreter; "
                    "install the kernel's Python where every user can read it (e.g. a venv made "
                    "from /usr/bin/python3)")
        raise SetupError("exec", "execve", plan.argv[0], exc.errno, hint) from None
