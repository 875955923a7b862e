"""`ns-kernel` and `python -m ns_kernel`: traitlets applications over the sandbox config.

  python -P -m ns_kernel [options] -f CONNECTION_FILE [ipykernel args...]   (kernel.json)
  ns-kernel install [--user|--sys-prefix|--prefix P] [--name N] [--display-name D] [options]
  ns-kernel run [options] -- CMD [ARGS...]
  ns-kernel doctor
"""
import os
import sys
import textwrap

from traitlets import Bool, TraitError, Unicode
from traitlets.config import Application
from traitlets.config.loader import ArgumentError

from . import kernelspec
from .config import Sandbox
from .errors import SetupError

SANDBOX_ALIASES = {
    "memory": "Sandbox.memory",
    "pids": "Sandbox.pids",
    "cpus": "Sandbox.cpus",
    "tmp-size": "Sandbox.tmp_size",
    "home": "Sandbox.home",
    "network": "Sandbox.network",
    "ro-bind": "Sandbox.ro_binds",
    "rw-bind": "Sandbox.rw_binds",
    "hide": "Sandbox.hide",
    "socket-dir": "Sandbox.socket_dir",
    "uid": "Sandbox.sandbox_uid",
    "gid": "Sandbox.sandbox_gid",
    "limits": "Sandbox.limits_backend",
    "cgroup-parent": "Sandbox.cgroup_parent",
    "seccomp": "Sandbox.seccomp",
}
SANDBOX_FLAGS = {
    "best-effort": ({"Sandbox": {"best_effort": True}},
                    "Skip (with a warning) limits the backend cannot enforce."),
    "allow-userns": ({"Sandbox": {"allow_userns": True}},
                     "Let the kernel make namespaces of its own (Sandbox.allow_userns)."),
}


class SandboxApp(Application):
    """Shared by the commands that build a sandbox: config files, then the command line."""
    aliases = SANDBOX_ALIASES
    flags = SANDBOX_FLAGS
    classes = [Sandbox]

    def parse_command_line(self, argv=None):
        # traitlets would log a bad option as a CRITICAL record and exit 1; we say it in
        # our one-line form instead (main() prints it).
        try:
            return Application.parse_command_line.__wrapped__(self, argv)
        except (TraitError, ArgumentError) as exc:
            raise SetupError("options", f"bad option: {exc}",
                             hint="see `ns-kernel --help-all`") from None

    def load_sandbox_config(self, argv):
        from jupyter_core.paths import jupyter_config_path
        for path in reversed(jupyter_config_path()):
            self.load_config_file("ns_kernel_config", path=path)
        self.parse_command_line(argv)
        return Sandbox(parent=self)


def split_at_connection_file(argv):
    """Launcher options come before `-f FILE`; everything after FILE goes to ipykernel."""
    from .argv import split
    parts = split(argv)
    if parts is None:
        raise SetupError("usage", "no connection file", hint=(
            "run as `python -P -m ns_kernel [options] -f CONNECTION_FILE`, as kernel.json does"))
    return parts


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
    flags = {**SANDBOX_FLAGS,
             "no-prestart": ({"KernelApp": {"prestart": False}},
                             "Exec the kernel once the sandbox is built (KernelApp.prestart).")}

    def start_kernel(self, argv, spawn=None, finish=None, prestarted=None):
        """spawn: who starts the monitor; finish(status): how to leave (default: exit like
        the kernel). A warm template's launcher child passes both (warm.py).
        prestarted: the kernel's interpreter, spawned by __main__ (prestart.py)."""
        from .launcher import Launch
        from .pid import exit_like
        options, connection_file, extra = split_at_connection_file(argv)
        config = self.load_sandbox_config(options)
        if prestarted and not self.prestart:    # said so in a config file
            prestarted.close()
            prestarted = None
        launch = Launch(config, connection_file, extra, self.kernel_socket_dir or None, spawn,
                        prestarted)
        status = launch.run()
        line = launch.explain(status)
        if line:
            print(line, file=sys.stderr, flush=True)
        (finish or exit_like)(status)


class InstallApp(SandboxApp):
    name = "ns-kernel-install"
    description = "Install the Isolated Python kernelspec, with the sandbox options given."
    kernel_name = Unicode(kernelspec.NAME, config=True, help="Kernelspec name (directory).")
    display_name = Unicode(kernelspec.DISPLAY_NAME, config=True,
                           help="Name shown in JupyterLab.")
    user = Bool(False, config=True, help="Install for the current user (~/.local/share/jupyter).")
    prefix = Unicode("", config=True, help="Install under PREFIX/share/jupyter/kernels.")
    warm = Bool(False, config=True, help="""
        Start kernels from a per-user warm template (kernel.json argv gets --warm): a fresh
        sandbox in a fraction of a cold start. See docs/performance.md.""")
    aliases = {**SANDBOX_ALIASES, "name": "InstallApp.kernel_name",
               "display-name": "InstallApp.display_name", "prefix": "InstallApp.prefix"}
    flags = {**SANDBOX_FLAGS,
             "user": ({"InstallApp": {"user": True}}, "Install for the current user."),
             "sys-prefix": ({"InstallApp": {"prefix": sys.prefix}},
                            f"Install into this Python's prefix ({sys.prefix}), e.g. a "
                            "JupyterHub single-user environment."),
             "warm": ({"InstallApp": {"warm": True}},
                      "Kernels start from a per-user warm template (--warm in kernel.json).")}

    def start_install(self, argv):
        self.parse_command_line(argv)
        Sandbox(parent=self)   # validate the options now, not at the first kernel start
        options = self.sandbox_options(argv) + (["--warm"] if self.warm else [])
        if (self.kernel_name != kernelspec.NAME
                and "kernel_name" not in self.cli_config.get("Sandbox", {})):
            # Its own persistent home and packages (Sandbox.kernel_name).
            options.append(f"--Sandbox.kernel_name={self.kernel_name}")
        spec = kernelspec.kernel_dict(options, self.display_name)
        path = kernelspec.install(self.kernel_name, spec, user=self.user,
                                  prefix=self.prefix or None)
        print(f"Installed kernelspec {self.kernel_name} ({self.display_name!r}) in {path}")

    @classmethod
    def sandbox_options(cls, argv):
        """argv minus install's own options (and their values, `--name N` as `--name=N`):
        what is left (the sandbox's options) goes into the spec's argv."""
        with_value = [f"--{a}" for a in cls.aliases if a not in SANDBOX_ALIASES]
        flags = [f"--{f}" for f in cls.flags if f not in SANDBOX_FLAGS]
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


def main(argv=None, spawn=None, finish=None, prestarted=None):
    """Entry point of `ns-kernel` and `python -m ns_kernel` (spawn, finish, prestarted:
    see KernelApp.start_kernel)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "install":
            return InstallApp().start_install(argv[1:])
        if argv and argv[0] == "run":
            return RunApp().start_run(argv[1:])
        if argv and argv[0] == "doctor":
            from .doctor import main as doctor
            return doctor(argv[1:])
        if not argv or argv[0] in ("-h", "--help", "--help-all"):
            KernelApp().parse_command_line(argv or ["--help"])   # prints help, exits 0
        return KernelApp().start_kernel(argv, spawn, finish, prestarted)
    except SetupError as exc:
        print(exc.line(), file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - traitlets' TraitError and friends: one line
        print(f"ns-kernel: {exc}", file=sys.stderr, flush=True)
        return 2
