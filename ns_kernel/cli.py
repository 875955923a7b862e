"""`ns-kernel` and `python -m ns_kernel`: traitlets applications over the sandbox config
(a kernel start's options are read by config.KernelApp, which shows them as usage).
"""
import os
import sys
import textwrap

from traitlets import Bool, Unicode

from . import argv as command_line, kernelspec
from .config import KERNEL_FLAGS, SANDBOX_ALIASES, SANDBOX_FLAGS, KernelApp, Sandbox, SandboxApp
from .errors import SetupError, one_line
from .net import MODES


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
        from . import launcher
        from .pid import exit_like
        if "--" not in argv:
            raise SetupError("usage", "no command", hint="use `ns-kernel run [options] -- CMD`")
        cut = argv.index("--")
        config = self.load_sandbox_config(argv[:cut])
        status, sup = launcher.run(config, command_line.command_start(argv[cut + 1:]))
        # A command's own exit code speaks for itself; a kill (OOM, signal) needs words.
        if os.WIFSIGNALED(status):
            sup.report(status)
        exit_like(status)


def main(argv=None, prestarted=None):
    """Entry point of `ns-kernel` and `python -m ns_kernel` (prestarted: see
    start_kernel)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        # A usage error, as with any command: the short form on stderr, exit 2.
        print("usage:\n" + textwrap.indent(KernelApp.examples, "  ")
              + "\n`ns-kernel --help` lists the options.", file=sys.stderr)
        return 2
    start = command_line.kernel_start(argv)
    if start:
        return start_kernel(start, prestarted=prestarted)
    return one_line(_command, argv, explain=_explain)


def start_kernel(start, prestarted=None, warm=None, finish=None):
    """Run the kernel start `start` (argv.KernelStart) to its end: what __main__ does, and
    a warm template's launcher. prestarted: the kernel's interpreter, spawned by __main__
    (prestart.py); warm: a warm template's launcher's (launcher.Warm); finish(status):
    how to leave (default: exit like the kernel). A failure: one line, exit code 1."""
    return one_line(_start_kernel, start, prestarted, warm, finish, explain=_explain)


def _start_kernel(start, prestarted, warm, finish):
    from . import launcher
    from .pid import exit_like
    app = KernelApp()
    config = app.load_sandbox_config(start.options)
    if prestarted and not app.prestart:     # said so in a config file
        prestarted.close()
        prestarted = None
    if warm and not app.prestart:           # a warm start's monitor then execs too
        import functools
        warm.spawn = functools.partial(warm.spawn, fresh=True)
    status, sup = launcher.run(config, start, prestarted, warm)
    sup.report(status)
    (finish or exit_like)(status)


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


def _explain(exc):
    """The container setting that avoids a failed start, if one does (trial.py)."""
    from .trial import explain
    return explain(exc)
