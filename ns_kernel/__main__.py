import sys

from . import argv

start = argv.kernel_start(sys.argv[1:])
prestarted = None
if start:
    # Before cli and its traitlets: a warm client must not pay for them (warm.py), and
    # the kernel's own interpreter starts now, while the launcher works (prestart.py).
    if start.warm:
        from .warm import client_main
        status = client_main(start)
        if status is not None:      # None: no template took it; the kernel starts cold
            sys.exit(status)
    if start.prestart:
        from . import prestart
        prestarted = prestart.spawn()

from .cli import main  # noqa: E402

try:
    sys.exit(main(prestarted=prestarted))
finally:
    if prestarted:
        prestarted.close()
