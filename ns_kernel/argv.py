"""How the launcher's command line reads (kernel.json's argv): its own options, then the
connection file, then whatever goes on to ipykernel. Read before anything is imported:
__main__ decides from it whether to start a warm client or a prestarted interpreter."""

CONNECTION_FILE_OPTIONS = ("-f", "--f", "--connection-file")


def split(argv):
    """(options, connection file, ipykernel's arguments); None if no connection file."""
    for i, arg in enumerate(argv):
        if arg in CONNECTION_FILE_OPTIONS:
            if i + 1 >= len(argv):
                return None
            return argv[:i], argv[i + 1], argv[i + 2:]
        for option in CONNECTION_FILE_OPTIONS:
            if arg.startswith(option + "="):
                return argv[:i], arg[len(option) + 1:], argv[i + 1:]
    return None


def options(argv):
    """The launcher's options of a kernel start, None if argv is not one."""
    parts = split(argv)
    return parts[0] if parts else None
