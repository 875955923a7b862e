"""PID 1 of the sandbox, and the forwarding of signals down the chain of processes.

A process that is PID 1 in its namespace ignores every signal it has no handler for, so
the kernel must never be PID 1: this small init is. It reaps orphans, forwards the
signals Jupyter sends, and exits when the kernel does, which kills whatever is left.
"""
import os
import signal
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def forward_signals(target):
    """Send each forwarded signal on to `target` (a pid, or -pgid for a process group; or
    a function that sends it)."""
    def forward(signum, _frame):
        if callable(target):
            target(signum)
            return
        try:
            os.kill(target, signum)
        except ProcessLookupError:
            pass
    for sig in FORWARDED:
        signal.signal(sig, forward)


def reset_signals():
    """A forked child starts from a clean slate: default handlers, nothing blocked."""
    signal.set_wakeup_fd(-1)
    for sig in (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def run_init(kernel_pid, report_status):
    """Reap every child; when the kernel exits, report its raw wait status and exit."""
    forward_signals(-kernel_pid)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == kernel_pid:
            report_status(status)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def exit_like(status):
    """Leave the way the kernel left (raw wait status): same exit code, or the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-code, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
    os.kill(os.getpid(), -code)
    sys.exit(128 - code)
