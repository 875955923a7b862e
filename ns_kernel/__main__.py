import sys

argv = sys.argv[1:]
if argv[:1] not in (["install"], ["run"], ["doctor"]):
    # Before cli: a warm client must not pay for importing traitlets (warm.py).
    from .warm import client_main, wants_warm
    if wants_warm(argv):
        sys.exit(client_main(argv))

from .cli import main  # noqa: E402

sys.exit(main())
