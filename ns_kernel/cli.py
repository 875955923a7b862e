"""`ns-kernel` and `python -m ns_kernel`: traitlets applications over the sandbox config.

  python -P -m ns_kernel [--cold] [options] -f CONNECTION_FILE [ipykernel args...]   (kernel.json)
  ns-kernel install [--user|--sys-prefix|--prefix P] [--name N] [--display-name D] [--cold] [options]
  ns-kernel run [options] -- CMD [ARGS...]
  ns-kernel doctor [options]
"""
import os
import sys
import textwrap

from traitlets import Bool, Unicode

from . import argv as command_line, kernelspec
from .config import SANDBOX_ALIASES, SANDBOX_FLAGS, Sandbox, SandboxApp
from .errors import SetupError
from .net import MODES

# The launcher's own flags besides the Sandbox's: `ns-kernel install` passes them on too.
KERNEL_FLAGS = {command_line.NO_PRESTART_FLAG[0]: command_line.NO_PRESTART_FLAG[1:]}


class KernelApp(SandboxApp):
    name = "ns-kernel-kernel"
    description = "Run ipykernel in a fresh sandbox for the client that wrote CONNECTION_FILE."
    examples = textwrap.dedent(__doc__.split("\n\n", 1)[1]).strip()
    kernel_socket_dir = Unicode("", config=True, help="""
        Make exactly this directory (it must not exist) the kernel's socket dir, instead of a
        fresh one under Sandbox.socket_dir. The kernel provisioner names it and gives the
        client an ipc connection with ip <dir>/k, so the client's paths <dir>/k-<port> are
        the kernel's own sockets: no link, no bridge.""")
    prestart = Bool(True, config=True, help="""
        Start the kernel's interpreter at once, while the sandbox is built, and let it join
        the finished sandbox (prestart.py): a cold start then costs about what a plain
        kernel's does. False: init execs the kernel once the sandbox is built.""")
    aliases = {**SANDBOX_ALIASES, "kernel-socket-dir": "KernelApp.kernel_socket_dir"}
    flags = {**SANDBOX_FLAGS, **KERNEL_FLAGS}

    def start_kernel(self, start, spawn=None, finish=None, prestarted=None, requester=None,
                     spare_monitor=None):
        """start: the command line (argv.KernelStart). spawn: who starts the monitor;
        finish(status): how to leave (default: exit like the kernel); requester: the warm
        request's socket, spare_monitor: the pid spawn makes the monitor (Launch). A warm
        template's launcher child passes these (warm.py). prestarted: the kernel's
        interpreter, spawned by __main__ (prestart.py)."""
        import functools
        from .launcher import Launch
        from .pid import exit_like
        config = self.load_sandbox_config(start.options)
        if prestarted and not self.prestart:    # said so in a config file
            prestarted.close()
            prestarted = None
        if spawn and not self.prestart:         # a warm start's monitor then execs too
            spawn = functools.partial(spawn, fresh=True)
        launch = Launch(config, start.connection_file, start.extra,
                        start.socket_dir or self.kernel_socket_dir or None, spawn, prestarted,
                        requester, spare_monitor)
        status = launch.run()
        launch.report(status)
        (finish or exit_like)(status)


class InstallApp(SandboxApp):
    name = "ns-kernel-install"
    description = "Install the Isolated Python kernelspec, with the sandbox options given."
    kernel_name = Unicode(kernelspec.NAME, config=True, help="Kernelspec name (directory).")
    display_name = Unicode(kernelspec.DISPLAY_NAME, config=True,
                           help="Name shown in JupyterLab.")
    user = Bool(False, config=True, help="Install for the current user (~/.local/share/jupyter).")
    prefix = Unicode("", config=True, help="Install under PREFIX/share/jupyter/kernels.")
    cold = Bool(False, config=True, help="""
        Start every kernel cold (kernel.json argv gets --cold): its own launcher and
        interpreter, no per-user warm template. Default: warm, a fresh sandbox in a
        fraction of a cold start. See docs/performance.md.""")
    aliases = {**SANDBOX_ALIASES, "name": "InstallApp.kernel_name",
               "display-name": "InstallApp.display_name", "prefix": "InstallApp.prefix"}
    flags = {**SANDBOX_FLAGS, **KERNEL_FLAGS,
             "user": ({"InstallApp": {"user": True}}, "Install for the current user."),
             "sys-prefix": ({"InstallApp": {"prefix": sys.prefix}},
                            f"Install into this Python's prefix ({sys.prefix}), e.g. a "
                            "JupyterHub single-user environment."),
             "cold": ({"InstallApp": {"cold": True}},
                      "Kernels start cold, without the warm template (--cold in kernel.json)."),
             "warm": ({"InstallApp": {"cold": False}},
                      "Kernels start from a per-user warm template (the default).")}

    def start_install(self, argv):
        self.parse_command_line(argv)
        sandbox = Sandbox(parent=self)   # validate the options now, not at the first start
        options = self.sandbox_options(argv) + ([command_line.COLD] if self.cold else [])
        if (self.kernel_name != kernelspec.NAME
                and "kernel_name" not in self.cli_config.get("Sandbox", {})):
            # Its own persistent home and packages (Sandbox.kernel_name).
            options.append(f"--Sandbox.kernel_name={self.kernel_name}")
        spec = kernelspec.kernel_dict(options, self.display_name,
                                      debugger=MODES[sandbox.network].debugger)
        path = kernelspec.install(self.kernel_name, spec, user=self.user,
                                  prefix=self.prefix or None)
        print(f"Installed kernelspec {self.kernel_name} ({self.display_name!r}) in {path}")

    @classmethod
    def sandbox_options(cls, argv):
        """argv minus install's own options (and their values, `--name N` as `--name=N`):
        what is left (the launcher's options) goes into the spec's argv."""
        with_value = [f"--{a}" for a in cls.aliases if a not in SANDBOX_ALIASES]
        flags = [f"--{f}" for f in cls.flags if f not in SANDBOX_FLAGS and f not in KERNEL_FLAGS]
        options, skip = [], False
        for arg in argv:
            if skip:
                skip = False
            elif arg in with_value:
                skip = True
            elif (arg not in flags and not arg.startswith(f"--{cls.__name__}.")
                  and not any(arg.startswith(n + "=") for n in with_value)):
                options.append(arg)
        return options


class RunApp(SandboxApp):
    name = "ns-kernel-run"
    description = "Run CMD in the same sandbox a kernel gets (to see what a kernel sees)."

    def start_run(self, argv):
        from .launcher import Launch
        from .pid import exit_like
        if "--" not in argv:
            raise SetupError("usage", "no command", hint="use `ns-kernel run [options] -- CMD`")
        cut = argv.index("--")
        config = self.load_sandbox_config(argv[:cut])
        launch = Launch(config, argv=argv[cut + 1:])
        status = launch.run()
        # A command's own exit code speaks for itself; a kill (OOM, signal) needs words.
        if os.WIFSIGNALED(status):
            print(launch.explain(status), file=sys.stderr, flush=True)
        exit_like(status)


def main(argv=None, prestarted=None):
    """Entry point of `ns-kernel` and `python -m ns_kernel` (prestarted: see
    KernelApp.start_kernel)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        # A usage error, as with any command: the short form on stderr, exit 2.
        print("usage:\n" + textwrap.indent(KernelApp.examples, "  ")
              + "\n`ns-kernel --help` lists the options.", file=sys.stderr)
        return 2
    start = command_line.kernel_start(argv)
    if start:
        return start_kernel(start, prestarted=prestarted)
    return _one_line(_command, argv)


def start_kernel(start, spawn=None, finish=None, prestarted=None, requester=None,
                 spare_monitor=None):
    """Run the kernel start `start` (argv.KernelStart): what __main__ does, and a warm
    template's launcher (see KernelApp.start_kernel)."""
    return _one_line(KernelApp().start_kernel, start, spawn, finish, prestarted, requester,
                     spare_monitor)


def resume_kernel(launch, finish):
    """In a warm kernel's monitor, once its launcher has handed it over (handoff.hand_off):
    the rest of start_kernel; finish(status) as there."""
    def resume():
        status = launch.resume()
        launch.report(status)
        finish(status)
    code = _one_line(resume)
    finish((code or 0) << 8)


def _command(argv):
    if argv[:1] == ["install"]:
        return InstallApp().start_install(argv[1:])
    if argv[:1] == ["run"]:
        return RunApp().start_run(argv[1:])
    if argv[:1] == ["doctor"]:
        from .doctor import main as doctor
        return doctor(argv[1:])
    if argv[0] in ("-h", "--help", "--help-all"):
        KernelApp().parse_command_line(argv)   # prints help, exits 0
    raise SetupError("usage", "no connection file", hint=(
        "run as `python -P -m ns_kernel [options] -f CONNECTION_FILE`, as kernel.json does"))


def _one_line(func, *args):
    """func(*args); a failure as one line on stderr and exit code 1 (2: not ours)."""
    try:
        return func(*args)
    except SetupError as exc:
        from .trial import explain      # the container setting that avoids it, if one does
        print(explain(exc).line(), file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - traitlets' TraitError and friends: one line
        print(f"ns-kernel: {exc}", file=sys.stderr, flush=True)
        return 2
