"""How a kernel start's command line reads, in one place: kernel.json's argv as the launcher
gets it, as a warm client hands it to its template, and as the provisioner finds it in a
kernelspec.

  python -P -m ns_kernel [--cold] [options] -f CONNECTION_FILE [ipykernel args...]

The launcher's options come first (traitlets reads them: config.KernelApp), then the
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
# The launcher's one flag besides the Sandbox's (config.KERNEL_FLAGS: `ns-kernel install` passes
# it on): KernelApp.prestart = False. Said on the command line it is read here too (a config
# file may say it as well: cli), in either spelling.
NO_PRESTART_FLAG = ("no-prestart", {"KernelApp": {"prestart": False}},
                    "Exec the kernel once the sandbox is built (KernelApp.prestart).")
NO_PRESTART = ("--" + NO_PRESTART_FLAG[0], "--KernelApp.prestart=False")
# KernelApp.kernel_socket_dir, which the provisioner adds to every start: read here, so
# that a start with no other option needs no argparse (~6 ms of a warm start).
SOCKET_DIR = ("--kernel-socket-dir", "--KernelApp.kernel_socket_dir")


# How a start runs, decided once, from its command line (KernelStart.how): a warm
# template's fork; a cold launcher with the kernel's interpreter prestarted; a cold launcher
# whose init execs the kernel; a command of `ns-kernel run`. (A warm start goes through the
# warm client, or, in a Jupyter server whose user's template listens, the provisioner.)
WARM_START, PRESTARTED, EXEC, RUN = "warm", "prestarted", "exec", "run"


class StartPath:
    """A way a kernel starts, as a kernelspec asks for it: name, what kernel.json's argv
    adds (options), whether the spec names the provisioner, how it runs then."""
    __slots__ = ("name", "options", "provisioner", "how")

    def __init__(self, name, options, provisioner, how):
        self.name, self.options, self.provisioner, self.how = name, options, provisioner, how


# Every way there is (the tests and the doctor start a kernel each way: conftest.start_paths,
# doctor.trial_kernels). `ns-kernel run` has no kernelspec.
START_PATHS = (
    StartPath("provisioner", (), True, WARM_START),     # JupyterLab's: ipc, no client process
    StartPath("argv", (), False, WARM_START),           # any other client: the TCP bridge
    StartPath("cold", (COLD,), False, PRESTARTED),      # `ns-kernel install --cold`
    StartPath("no-prestart", (NO_PRESTART[0],), False, EXEC),
)


class KernelStart:
    """A kernel start's command line, split. options: the launcher's, without --warm,
    --cold and --kernel-socket-dir (socket_dir, '' if not given); how: WARM_START,
    PRESTARTED, EXEC (--no-prestart said) or RUN (no connection file)."""
    __slots__ = ("options", "connection_file", "extra", "how", "socket_dir")

    def __init__(self, options, connection_file, extra, cold, socket_dir=""):
        self.options, self.connection_file, self.extra = options, connection_file, extra
        self.socket_dir = socket_dir
        if not connection_file:
            self.how = RUN
        elif any(option in NO_PRESTART for option in options):
            self.how = EXEC
        else:
            self.how = PRESTARTED if cold else WARM_START

    @property
    def warm(self):
        return self.how == WARM_START

    def argv(self):
        """The command line again, without --warm and --cold (what a warm template's launcher
        runs)."""
        socket_dir = [f"{SOCKET_DIR[0]}={self.socket_dir}"] if self.socket_dir else []
        return [*self.options, *socket_dir, "-f", self.connection_file, *self.extra]


def command_start(command):
    """What `ns-kernel run [options] -- CMD...` starts: CMD in a kernel's sandbox, no
    connection file."""
    return KernelStart([], None, list(command), True)


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
                       list(extra), COLD in options, socket_dir)


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
