"""How a kernel start's command line reads, in one place: kernel.json's argv as the launcher
gets it, as a warm client hands it to its template, and as the provisioner finds it in a
kernelspec.

  python -P -m ns_kernel [--cold] [options] -f CONNECTION_FILE [ipykernel args...]

The launcher's options come first (traitlets reads them: cli.KernelApp), then the
connection file, then whatever goes on to ipykernel. Read before anything is imported:
__main__ decides from it whether to start a warm client or a prestarted interpreter, so
this module imports nothing. A kernel starts warm (warm.py) unless its command line says
`--cold` or `--no-prestart`: read here alone, from the command line only, since it decides
which process starts the kernel before any config file is read. `--warm`, which kernelspecs
of older versions carry, says the default.
"""

SUBCOMMANDS = ("install", "run", "doctor")
CONNECTION_FILE_OPTIONS = ("-f", "--f", "--connection-file")
WARM = "--warm"
COLD = "--cold"
# The launcher's one flag besides the Sandbox's (cli.KERNEL_FLAGS: `ns-kernel install` passes
# it on): KernelApp.prestart = False. Said on the command line it is read here too (a config
# file may say it as well: cli), in either spelling.
NO_PRESTART_FLAG = ("no-prestart", {"KernelApp": {"prestart": False}},
                    "Exec the kernel once the sandbox is built (KernelApp.prestart).")
NO_PRESTART = ("--" + NO_PRESTART_FLAG[0], "--KernelApp.prestart=False")
# KernelApp.kernel_socket_dir, which the provisioner adds to every start: read here, so
# that a start with no other option needs no argparse (~6 ms of a warm start).
SOCKET_DIR = ("--kernel-socket-dir", "--KernelApp.kernel_socket_dir")


class KernelStart:
    """A kernel start's command line, split. options: the launcher's, without --warm,
    --cold and --kernel-socket-dir (socket_dir, '' if not given). warm: from a warm
    template (neither --cold nor --no-prestart said)."""
    __slots__ = ("options", "connection_file", "extra", "warm", "socket_dir")

    def __init__(self, options, connection_file, extra, warm, socket_dir=""):
        self.options, self.connection_file, self.extra = options, connection_file, extra
        self.socket_dir = socket_dir
        self.warm = warm and self.prestart

    @property
    def prestart(self):
        return not any(option in NO_PRESTART for option in self.options)

    def argv(self):
        """The command line again, without --warm and --cold (what a warm template's launcher
        runs)."""
        socket_dir = [f"{SOCKET_DIR[0]}={self.socket_dir}"] if self.socket_dir else []
        return [*self.options, *socket_dir, "-f", self.connection_file, *self.extra]


def kernel_start(argv):
    """The KernelStart of argv; None if argv is not one (a subcommand, --help, no
    connection file)."""
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return None
    for i, arg in enumerate(argv):
        if arg in CONNECTION_FILE_OPTIONS:
            if i + 1 >= len(argv):
                return None
            options, connection_file, extra = argv[:i], argv[i + 1], argv[i + 2:]
            break
        option = next((o for o in CONNECTION_FILE_OPTIONS if arg.startswith(o + "=")), None)
        if option:
            options, connection_file, extra = argv[:i], arg[len(option) + 1:], argv[i + 1:]
            break
    else:
        return None
    options, socket_dir = _take(SOCKET_DIR, options)
    return KernelStart([o for o in options if o not in (WARM, COLD)], connection_file,
                       list(extra), COLD not in options, socket_dir)


def _take(names, options):
    """options without the one `NAME=VALUE` or `NAME VALUE` of names, and VALUE; or as
    they are, and '', unless it is given exactly once with a value that is no option
    (traitlets then says what is wrong, as it always has)."""
    found = []
    for i, option in enumerate(options):
        name, eq, value = option.partition("=")
        if name in names:
            if not eq:
                value = options[i + 1] if i + 1 < len(options) else ""
            found.append((i, 1 if eq else 2, value))
    if len(found) != 1 or not found[0][2] or found[0][2].startswith("-"):
        return options, ""
    i, width, value = found[0]
    return options[:i] + options[i + width:], value
