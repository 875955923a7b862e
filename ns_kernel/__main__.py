# First: Jupyter's interrupt (SIGINT to our process group; it sends one before every
# restart and shutdown, issue 28) may come while this process starts, before anything of
# ours runs; then it has nothing to interrupt, and Python's KeyboardInterrupt would kill
# the kernel's start instead. Until the warm client forwards signals (warm.client_main)
# or the launcher keeps them (supervise.Supervisor; a pending SIGINT is dropped), one is ignored.
# A handler, not SIG_IGN, which a process exec'd from here would keep (a template, a
# prestarted kernel). What reaches us sooner (in Python's own start) still kills us: a
# restart then starts the new kernel anyway (bridge.STALE_CONTROL).
import _signal

_signal.signal(_signal.SIGINT, lambda _signum, _frame: None)

import sys  # noqa: E402

from . import argv  # noqa: E402

start = argv.kernel_start(sys.argv[1:])
prestarted = None
if not start:
    # install, run, doctor, --help: Ctrl-C as in any command (`run` forwards its own).
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
if start:
    # Before cli and its traitlets: a warm client must not pay for them (warm.py), and
    # the kernel's own interpreter starts now, while the launcher works (prestart.py).
    if start.how == argv.WARM_START:
        from .warm import client_main
        status = client_main(start)
        if status is not None:      # None: no template took it; the kernel starts cold
            sys.exit(status)
    if start.how != argv.EXEC:
        from . import prestart
        prestarted = prestart.spawn()

from .cli import main  # noqa: E402

try:
    sys.exit(main(prestarted=prestarted))
finally:
    if prestarted:
        prestarted.close()
