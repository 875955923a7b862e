import sys

from . import argv

args = sys.argv[1:]
options = argv.options(args) if args[:1] not in (["install"], ["run"], ["doctor"]) else None
prestarted = None
if options is not None:
    # Before cli and its traitlets: a warm client must not pay for them (warm.py), and
    # the kernel's own interpreter starts now, while the launcher works (prestart.py).
    if "--warm" in options:
        from .warm import client_main
        sys.exit(client_main(args))
    from . import prestart
    if prestart.wanted(options):
        prestarted = prestart.spawn()

from .cli import main  # noqa: E402

try:
    sys.exit(main(prestarted=prestarted))
finally:
    if prestarted:
        prestarted.close()
