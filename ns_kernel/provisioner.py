"""The kernel provisioner: how JupyterLab (jupyter_server) and every jupyter_client >= 7
client start Isolated Python when kernel.json names it in metadata.kernel_provisioner.

It is jupyter_client's LocalProvisioner (Popen, killpg, wait) with two differences that
matter. First, the connection is `ipc`, with ip `<socket dir>/k`, where <socket dir> is the
kernel's private 0700 socket dir. The launcher is told to make exactly that dir
(--kernel-socket-dir), so the paths the client connects to, <ip>-<port>, are the kernel's
own sockets: no TCP port is opened, no bridge runs, no link is made.

The dir is chosen once per provisioner and kept across restarts, so the client's ZMQ
sockets reconnect to the same paths by themselves. Settings in the kernelspec's
`kernel_provisioner.config` stanza are Sandbox traits (`{"memory": "1G", "home":
"readonly"}`); they reach the launcher as `--Sandbox.<name>=<value>` after the argv's own
options, so they win over them.

Second, a warm start needs no process of its own: when the user's warm template listens, the
provisioner hands it the start itself (warm.launch, as the warm client would) and
supervises the launcher it forks, and the monitor the launcher hands the kernel to once it
runs, through the request's socket (warm.Launcher, Popen's poll, wait and send_signal);
otherwise it Popens the command, as LocalProvisioner does, and the client started that way
makes the template (a user's first kernel).

It reads the launcher's options with the launcher's own parser (config.KernelApp), but the
config files as data only: ns_kernel_config.json, never ns_kernel_config.py, which would
run in the Jupyter server (the launcher, a process of its own, runs both).
"""
import asyncio
import os
import sys
import time

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Dict, TraitError, Unicode

from . import kernelspec, socketdir, template, warm
from .config import KernelApp
from .config import Sandbox
from .errors import SetupError
from .plan import under

SETTINGS = frozenset(Sandbox.class_trait_names(config=True))
# What jupyter_client's factory passes besides the stanza.
FROM_JUPYTER = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})
# After a SIGKILL of the launcher, the sandbox's monitor removes the socket dir; a restart
# must not make the same dir before that has happened.
SOCKET_DIR_GONE_TIMEOUT = 5.0


class ProvisionerConfigError(ValueError):
    """A bad kernelspec for this provisioner; jupyter_server shows the text to the user."""

    def __init__(self, what):
        super().__init__(f"ns-kernel: {what}")


def settings_argv(settings):
    """Sandbox settings as launcher options (lists as repeated options, as traitlets reads
    them)."""
    argv = []
    for name, value in sorted(settings.items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--Sandbox.{name}={item}" for item in values]
    return argv


class IsolatedProvisioner(LocalProvisioner):
    """Starts the ns-kernel launcher with a direct ipc connection (see the module doc)."""

    settings = Dict(help="""
        Sandbox settings from the kernelspec's kernel_provisioner.config stanza (trait
        name -> value), checked when the provisioner is made.""")

    kernel_socket_dir = Unicode("", help="""
        The kernel's own socket dir on the host: chosen at the first launch under
        Sandbox.socket_dir (or the default base), kept across restarts.""")

    _config = None      # the launcher's settings (Sandbox), read at the first launch

    def __init__(self, **kwargs):
        # The factory passes the config stanza as keyword arguments: take the Sandbox
        # settings out, and refuse what is neither ours nor jupyter_client's.
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in SETTINGS}
        unknown = sorted(set(kwargs) - FROM_JUPYTER)
        if unknown:
            raise ProvisionerConfigError(
                f"kernel_provisioner config: unknown setting {unknown[0]!r} (use Sandbox "
                f"settings: {', '.join(sorted(SETTINGS))})")
        try:
            Sandbox(**settings)
        except TraitError as exc:
            raise ProvisionerConfigError(f"kernel_provisioner config: {exc}") from None
        super().__init__(settings=settings, **kwargs)

    async def pre_launch(self, **kwargs):
        km = self.parent
        start = kernelspec.launcher_start(self.kernel_spec.argv)
        if start is None:
            raise ProvisionerConfigError(
                f"{kernelspec.PROVISIONER} runs the launcher only: kernel.json argv must be "
                "`python -P -m ns_kernel [options] -f {connection_file}`, not "
                f"{' '.join(self.kernel_spec.argv)!r} (installed by an older ns_kernel? run "
                "`ns-kernel install` again)")
        extra = settings_argv(self.settings)
        # The launcher's view of its settings (argv, stanza, JSON config files): the same
        # socket base, and bad options fail here, in the server's words, before any launch.
        # Once: a restart has the same kernelspec.
        if self._config is None:
            self._config = self._launcher_config(start.options, extra)
        config = self._config
        check_server_imports(kwargs.get("cwd") or os.getcwd(), config.rw_binds)
        if not self.kernel_socket_dir:
            self.kernel_socket_dir = socketdir.choose(config.socket_dir, warn=self.log.warning)
        km.transport = "ipc"
        km.ip = f"{self.kernel_socket_dir}/k"
        kwargs = await super().pre_launch(**kwargs)
        cmd = kwargs["cmd"]
        at = cmd.index("-f")
        kwargs["cmd"] = [*cmd[:at], *extra, f"--kernel-socket-dir={self.kernel_socket_dir}",
                         *cmd[at:]]
        return kwargs

    async def launch_kernel(self, cmd, **kwargs):
        # In a thread: a template that is slow to answer must not stall the server.
        launcher = await asyncio.to_thread(self._warm_launcher, cmd, kwargs)
        if launcher is None:
            return await super().launch_kernel(cmd, **kwargs)
        self.process, self.pid, self.pgid = launcher, launcher.pid, None
        self.cwd = kwargs.get("cwd") or os.getcwd()
        return self.connection_info

    def _warm_launcher(self, cmd, kwargs):
        """A warm start without the client: the launcher the user's running template forks
        for cmd, asked for from here (warm.launch, what the client would send); None when
        cmd must be Popen'd as LocalProvisioner does: a cold start; another interpreter
        than the server's (the template is keyed by it); no template listening yet (the
        client starts it: a user's first kernel); stdio that are not fds; a kernel that
        must outlive the server (`independent`: the launcher dies with its requester)."""
        start = kernelspec.launcher_start(cmd)
        if not (start and start.warm) or cmd[0] != sys.executable or kwargs.get("independent"):
            return None
        stdio = [_fd(kwargs.get(name), fd) for fd, name in ((1, "stdout"), (2, "stderr"))]
        if None in stdio:
            return None
        # What jupyter_client's launch_kernel gives the process it starts.
        env = dict(kwargs.get("env") or os.environ, JPY_PARENT_PID=str(os.getpid()))
        template.tell_at_exit(warm.socket_path(env))     # it outlives the server
        try:
            sock = warm.connect(warm.socket_path(env))
        except SetupError:
            return None     # the client says why, in the server log, and starts cold
        if sock is None:
            return None
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return warm.launch(sock, start.argv(), env, kwargs.get("cwd") or os.getcwd(),
                               [devnull, *stdio])
        finally:
            os.close(devnull)

    def _launcher_config(self, options, extra):
        try:
            app = KernelApp()
            app.parse_command_line(options)
            # traitlets takes one value per option: a setting in both places would make the
            # launcher refuse to start, so say which one, here.
            both = sorted(set(app.cli_config.get("Sandbox", {})) & set(self.settings))
            if both:
                raise ProvisionerConfigError(
                    f"{', '.join(both)} set both in kernel.json's argv and in its "
                    "kernel_provisioner config: keep one")
            return KernelApp().load_sandbox_config(options + extra, run_config_code=False)
        except (SetupError, TraitError) as exc:
            why = exc.line().removeprefix("ns-kernel: ") if isinstance(exc, SetupError) else exc
            raise ProvisionerConfigError(f"launcher options {options + extra}: {why}") from None

    async def shutdown_requested(self, restart=False):
        await super().shutdown_requested(restart)
        # The KernelManager closes this control socket once the kernel has gone, with a
        # linger of 100 ms, and a restart's kernel binds the same paths (the socket dir is
        # kept): a shutdown_request the old kernel never read (it died first) would be the
        # new one's, which would obey it (bridge.STALE_CONTROL, issue 28). By then nobody
        # is there for it: drop it at the close. The kernel it was for, while it lives, still
        # gets it: linger counts only from the close.
        control = getattr(self.parent, "_control_socket", None)
        if control is not None:
            control.linger = 0

    async def cleanup(self, restart=False):
        await super().cleanup(restart)
        if not self.kernel_socket_dir:
            return
        # The launcher removes its socket dir as it exits; after a SIGKILL the sandbox's
        # monitor does, a moment later. Wait for that (a restart makes the same dir), then
        # remove what nobody did.
        deadline = time.monotonic() + SOCKET_DIR_GONE_TIMEOUT
        while os.path.lexists(self.kernel_socket_dir) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        socketdir.remove(self.kernel_socket_dir)

    async def get_provisioner_info(self):
        info = await super().get_provisioner_info()
        info.update(kernel_socket_dir=self.kernel_socket_dir, settings=self.settings)
        return info

    async def load_provisioner_info(self, provisioner_info):
        await super().load_provisioner_info(provisioner_info)
        self.kernel_socket_dir = provisioner_info.get("kernel_socket_dir", "")
        self.settings = provisioner_info.get("settings", {})


def check_server_imports(cwd, rw_binds):
    """This process is the Jupyter server: nothing on its import path may lie where the
    kernel may write (the notebook folder, a --rw-bind). A server started as `python -m
    jupyterlab` from the folder has it first, and imports modules as late as a user's
    first export (nbconvert): what the kernel put there would run in the server."""
    writable = [os.path.realpath(p) for p in (cwd, *rw_binds)]
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        inside = next((w for w in writable if under(path, w)), None)
        if inside:
            raise ProvisionerConfigError(
                f"the Jupyter server imports from {path}, which this kernel may write "
                f"({inside}): what it put there would run in the server; start the server "
                "as `jupyter lab` (not `python -m` from that folder) and keep PYTHONPATH "
                "out of it")


def _fd(stream, default):
    """The fd a launch_kernel stdout/stderr argument means (None: ours); None if it is
    not one (subprocess.PIPE or DEVNULL)."""
    if stream is None:
        return default
    if hasattr(stream, "fileno"):
        return stream.fileno()
    return stream if isinstance(stream, int) and stream >= 0 else None
