"""The sandbox's settings, one traitlets Configurable documented by `ns-kernel --help-all`,
and the one parser that reads them for every command and for the provisioner.

Read from ns_kernel_config.py/.json on the Jupyter config path, then the kernelspec's argv
flags (or the provisioner's config stanza), then the command line, later ones winning.
"""
import argparse
import os

import traitlets
from traitlets import Bool, CaselessStrEnum, Int, List, TraitError, Unicode, validate
from traitlets.config import Application, Configurable
from traitlets.config.loader import ArgumentError, KVArgParseConfigLoader

from .argv import NO_PRESTART_FLAG
from .errors import SetupError
from .limittable import LIMITS
from .net import DEFAULT_MODE, MODES
from .sizes import parse_size

CONFIG_FILE = "ns_kernel_config"


# The defaults of Sandbox.env_allow, env_deny and env_keep: the warm template compiles
# them once for all its kernels (plan.env_pattern).
ENV_ALLOW = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "COLORTERM", "NO_COLOR",
    "FORCE_COLOR", "CLICOLOR*", "PAGER", "EDITOR", "USER", "LOGNAME", "SHELL",
    "PYTHON*", "VIRTUAL_ENV", "CONDA_*", "PIP_*", "JUPYTER_*", "JPY_*", "MPLBACKEND",
    "PYDEVD_*", "OMP_*", "OPENBLAS_*", "MKL_*", "NUMEXPR_*", "CUDA_VISIBLE_DEVICES",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)
ENV_DENY = (
    "JPY_PARENT_PID", "JUPYTERHUB_*", "JUPYTER_TOKEN", "JPY_API_TOKEN", "*TOKEN*", "*SECRET*",
    "*PASSWORD*", "*PASSWD*", "*CREDENTIAL*", "*_KEY", "SSH_AUTH_SOCK", "SSH_AGENT_PID",
    "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
    "KRB5CCNAME", "GPG_AGENT_INFO", "SUDO_*",
)
ENV_KEEP = ("PYTHONHASHSEED",)


class Sandbox(Configurable):
    """What the kernel sees and may use. Every kernel started by ns-kernel gets a fresh sandbox."""

    sandbox_uid = Int(65534, config=True, help="""
        Host uid the sandbox runs as when ns-kernel is started by real root (default 65534,
        nobody): host root is never root inside. The kernel has the same uid number inside.
        Ignored for ordinary users, who keep their own uid.""")

    sandbox_gid = Int(65534, config=True, help="""
        Host gid the sandbox runs as when started by real root (default 65534, nogroup).
        Ignored for ordinary users.""")

    home = CaselessStrEnum(["persistent", "private", "readonly", "shared"],
                           default_value="persistent", config=True, help="""
        What the kernel sees at $HOME: 'persistent' (default) a home of the sandbox's own that
        outlives the kernel, <state_dir>/<kernel_name>/home on the host, not the real home; 'private'
        an empty tmpfs that vanishes with the kernel (what it leaves there is reported when it
        ends); 'readonly' the real home, read-only; 'shared' the real home, read-write.
        The notebook's working directory is read-write whatever this says.""")

    kernel_name = Unicode("isolated-python", config=True, help="""
        The kernelspec's name (`ns-kernel install --name` writes it into kernel.json): each
        name keeps its own persistent home and installed packages under state_dir, which
        kernels of other names do not see (also
        the directory name under state_dir).""")

    state_dir = Unicode("", config=True, help="""
        Where each kernelspec name keeps what outlives its kernels, one 0700 directory per
        name: `home` (with --home persistent) and `packages` (what `%pip install` adds to a
        venv kernel). Default '': $XDG_DATA_HOME/ns-kernel, else ~/.local/share/ns-kernel.
        Per user: a root-run hub's kernels keep theirs under root's, owned by the sandbox
        uid.""")

    network = CaselessStrEnum(list(MODES), default_value=DEFAULT_MODE, config=True, help=" ".join(
        f"'{m.name}'{' (default)' if m.name == DEFAULT_MODE else ''}: {m.help}"
        for m in MODES.values()))     # net.MODES: what each one means

    proxy_allow = List(Unicode(), config=True, help="""
        With network 'proxy': where the kernel may go, as HOST[:PORT] entries (several per
        item, comma-separated): a name (pypi.org), a pattern (*.github.com: its subdomains;
        *: every name), an exact address (203.0.113.7:8080, [2001:db8::1]), or a preset
        (pypi, conda, github, huggingface: their hosts, port 443). An entry without a port
        opens CONNECT to 443 and plain HTTP to 80 only: HTTP(S), no other port unless named.
        Empty (default): the public internet, on those two ports. An address entry is the
        only way to open the host's own, loopback, private, link-local or metadata
        addresses, and opens only that address.""")

    proxy_deny = List(Unicode(), config=True, help="""
        With network 'proxy': where the kernel may not go, even if proxy_allow says so
        (same entries as proxy_allow; one without a port denies every port; an address
        entry also catches names resolving to it).""")

    tmp_size = Unicode("1G", config=True, help="""
        Size cap of each private tmpfs: /tmp, /var/tmp, /dev/shm and a private $HOME
        (default 1G; suffixes K, M, G). Memory used there counts against the memory limit.""")

    ro_binds = List(Unicode(), config=True, help="""
        Extra host paths to show read-only at the same path inside (e.g. a shared data set).""")

    rw_binds = List(Unicode(), config=True, help="""
        Extra host paths to show read-write at the same path inside.""")

    hide = List(Unicode(), config=True, help="""
        Extra host paths to cover with an empty read-only directory wherever they would be
        visible (added to the Jupyter runtime dir, /run/user/UID and ns-kernel's socket dirs,
        which are always hidden).""")

    hostname_prefix = Unicode("isolated", config=True, help="""
        The kernel's hostname is PREFIX-<first 8 characters of the kernel id>.""")

    env_allow = List(Unicode(), default_value=list(ENV_ALLOW), config=True, help="""
        The only environment variables that reach the kernel (shell-style patterns, matched
        case-insensitively), unless env_deny matches them too; a value holding credentials
        in a URL (scheme://user:password@host) never does. Add what your kernels need with
        env_keep. The kernel's HOME, JPY_PARENT_PID and its packages' PYTHONPATH, PIP_PREFIX
        and PATH entry are set by ns-kernel.""")

    env_deny = List(Unicode(), default_value=list(ENV_DENY), config=True, help="""
        Variables removed even when env_allow matches them (shell-style patterns, matched
        case-insensitively): tokens and sockets of the host have no business inside.""")

    env_keep = List(Unicode(), default_value=list(ENV_KEEP), config=True, help="""
        Variables passed to the kernel as they are, whatever env_allow and env_deny say
        (shell-style patterns).""")

    socket_dir = Unicode("", config=True, help="""
        Directory that holds each kernel's private 0700 socket directory; it must be the
        user's own, 0700, not a symlink (made so if missing). Default:
        $XDG_RUNTIME_DIR/ns-kernel if that is set and writable, else /tmp/ns-kernel-UID,
        or, when another user made that first, a 0700 dir of the user's own under $TMPDIR
        (said in the log). Keep it short: Unix socket paths are limited to 107 bytes.""")

    tcp_clients = CaselessStrEnum(["owner", "any"], default_value="owner", config=True, help="""
        Who may connect to a kernel's TCP ports (clients whose connection file says tcp, so
        the launcher's bridge): 'owner' (default): of local clients, only those of the
        launcher's uid (the Jupyter server that started the kernel, the user's own
        consoles and tunnels); other hosts as with a plain kernel. 'any': every local user
        too, as a plain kernel lets them (for a server of another uid that starts kernels
        under sudo): then whoever connects to iopub reads the kernel's output unless the
        server uses transport encryption (transport_encryption = required).""")

    seccomp = Unicode("default", config=True, help="""
        'default': a seccomp filter answers EPERM to the syscalls a notebook never needs
        (keyrings, bpf, perf_event_open, userfaultfd, io_uring, kexec, modules,
        open_by_handle_at, the host's clock, mounts, unshare/setns; see ns_kernel/seccomp.py),
        loaded last before the kernel runs. 'off': none (the server log says so). Or the
        absolute path of a Docker/OCI seccomp profile (JSON), e.g. the one your containers
        run with: read by the launcher on the host, applied as runc applies it to a
        container without capabilities; it must be root's or yours, not group- or
        world-writable, and not where the kernel may write.""")

    @validate("seccomp")
    def _valid_seccomp(self, proposal):
        value = proposal["value"]
        if value.lower() in ("default", "off"):
            return value.lower()
        if not os.path.isabs(value):
            raise TraitError(f"seccomp: {value!r} is not 'default', 'off' or the absolute "
                             "path of a Docker/OCI seccomp profile")
        return value

    allow_userns = Bool(False, config=True, help="""
        Let the kernel create namespaces of its own (user, mount, pid, net, ...), e.g. for a
        browser's own sandbox. Default False: the sandbox's user namespace allows none
        (bubblewrap's --disable-userns), which keeps the largest part of the host kernel's
        attack surface out of reach. True also lets unshare and setns through the seccomp
        filter.""")

    # memory, pids, cpus: one trait per limit, from its row (limittable.LIMITS).
    vars().update({limit.name: getattr(traitlets, limit.trait)(limit.default, config=True,
                                                               help=limit.help)
                   for limit in LIMITS})

    limits_backend = CaselessStrEnum(["auto", "cgroup2", "cgroup1", "rlimit"], default_value="auto",
                                     config=True, help="""
        How limits are enforced: 'auto' (default) picks a writable delegated cgroup v2 subtree,
        then cgroup v1 (root), then rlimits; or force one of them.""")

    cgroup_parent = Unicode("", config=True, help="""
        A cgroup v2 directory where this user may create cgroups (delegated by systemd
        `Delegate=yes` or by the hub), with memory, pids and cpu enabled in its
        cgroup.subtree_control. It must lie in the same delegated subtree as the Jupyter
        server's own cgroup (moving a process needs write access to their common ancestor).
        Default '': none for ordinary users; real root uses <cgroup2 mount>/ns-kernel.""")

    idmap_folder = Bool(False, config=True, help="""
        Started by root only: when root (or another user) owns the notebook folder, show it
        to the kernel (which runs as sandbox_uid, never root) through an idmapped mount, so
        that it writes the folder as an ordinary user's kernel writes that user's: the
        owner's files are the kernel's there, and what the kernel makes is the owner's on the
        host. For graders (docs/grading.md): the same grade whoever grades. Off by default,
        since every file the kernel makes there is then root's on the host: root must never
        run git (a shell prompt's git status, a Lab git extension), make, or any other tool
        that obeys files below that folder, and must keep it out of every path it runs or
        loads from. Never for the system's dirs, any home itself or its dot entries, a
        container's root, or without the default seccomp filter (which keeps setuid and
        setgid bits off).""")

    best_effort = Bool(False, config=True, help="""
        If True, a limit the chosen backend cannot enforce is skipped with a warning in the
        log instead of refusing to start the kernel.""")

    @validate("tmp_size")
    def _valid_size(self, proposal):
        try:
            parse_size(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"{proposal['trait'].name}: {exc}") from None
        return proposal["value"]

    @validate("proxy_allow", "proxy_deny")
    def _valid_entries(self, proposal):
        from .proxy import parse_entries
        try:
            parse_entries(proposal["value"], f"Sandbox.{proposal['trait'].name}")
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    @validate(*(limit.name for limit in LIMITS))
    def _valid_limit(self, proposal):
        name = proposal["trait"].name
        try:
            next(limit for limit in LIMITS if limit.name == name).parse(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"{name}: {exc}") from None
        return proposal["value"]


SANDBOX_ALIASES = {
    **{limit.name: f"Sandbox.{limit.name}" for limit in LIMITS},
    "tmp-size": "Sandbox.tmp_size",
    "home": "Sandbox.home",
    "network": "Sandbox.network",
    "allow": "Sandbox.proxy_allow",
    "deny": "Sandbox.proxy_deny",
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
# The launcher's own flags besides the Sandbox's: `ns-kernel install` passes them on too.
KERNEL_FLAGS = {NO_PRESTART_FLAG[0]: NO_PRESTART_FLAG[1:]}
SANDBOX_FLAGS = {
    "best-effort": ({"Sandbox": {"best_effort": True}},
                    "Skip (with a warning) limits the backend cannot enforce."),
    "idmap-folder": ({"Sandbox": {"idmap_folder": True}},
                     "As root: the kernel writes the folder root owns (Sandbox.idmap_folder)."),
    "allow-userns": ({"Sandbox": {"allow_userns": True}},
                     "Let the kernel make namespaces of its own (Sandbox.allow_userns)."),
}


class _Parser(KVArgParseConfigLoader.parser_class):
    def error(self, message):
        raise argparse.ArgumentError(None, message)    # not a usage text and sys.exit(2)


class _Loader(KVArgParseConfigLoader):
    parser_class = _Parser


class SandboxApp(Application):
    """What every command that builds a sandbox shares, and the provisioner too: the
    Sandbox's settings from config files, then the command line."""
    aliases = SANDBOX_ALIASES
    flags = SANDBOX_FLAGS
    classes = [Sandbox]

    def parse_command_line(self, argv=None):
        # traitlets would log a bad option as a CRITICAL record and exit 1, and argparse
        # exit 2 on a missing value (a SystemExit inside a Jupyter server); we say it in
        # our one-line form instead.
        try:
            return Application.parse_command_line.__wrapped__(self, argv)
        except (TraitError, ArgumentError, argparse.ArgumentError) as exc:
            raise SetupError("options", f"bad option: {exc}",
                             hint="see `ns-kernel --help-all`") from None

    def _create_loader(self, argv, aliases, flags, classes):
        return _Loader(argv, aliases, flags, classes=classes, log=self.log,
                       subcommands=self.subcommands)

    def load_sandbox_config(self, argv, run_config_code=True):
        """The Sandbox of the config files on the Jupyter config path, then argv.
        run_config_code=False: read ns_kernel_config.json alone, never run the .py (the
        provisioner, inside the Jupyter server, reads settings as data)."""
        from jupyter_core.paths import jupyter_config_path
        from traitlets.config.loader import ConfigFileNotFound, JSONFileConfigLoader
        from .plan import check_config_dir
        cwd = os.path.realpath(".")
        for path in reversed(jupyter_config_path()):
            if not any(os.path.exists(f"{path}/{CONFIG_FILE}{ext}") for ext in (".json", ".py")):
                continue    # traitlets would try two loaders to find nothing: ~1 ms a dir
            # Before anything of it is read: a "." on JUPYTER_CONFIG_PATH is the notebook
            # folder, the kernel's to write (the plan would refuse it, too late).
            check_config_dir(cwd, os.path.realpath(path))
            if run_config_code:
                self.load_config_file(CONFIG_FILE, path=path)
                continue
            try:
                self.update_config(JSONFileConfigLoader(f"{CONFIG_FILE}.json", path).load_config())
            except ConfigFileNotFound:
                pass
            except ValueError as exc:    # not JSON
                raise SetupError("options", "read", f"{path}/{CONFIG_FILE}.json",
                                 hint=str(exc)) from None
        if argv:    # the default kernelspec has no options: argparse costs ~6 ms a start
            self.parse_command_line(argv)
        return Sandbox(parent=self)


class KernelApp(SandboxApp):
    """A kernel start's options: the Sandbox's and the launcher's own two. What the
    launcher (cli.start_kernel) and the provisioner, inside the Jupyter server, read
    kernel.json's argv with."""
    name = "ns-kernel-kernel"
    description = "Run ipykernel in a fresh sandbox for the client that wrote CONNECTION_FILE."
    examples = """\
python -P -m ns_kernel [--cold] [options] -f CONNECTION_FILE [ipykernel args...]   (kernel.json)
ns-kernel install [--user|--sys-prefix|--prefix P] [--name N] [--display-name D] [--cold] [options]
ns-kernel run [options] -- CMD [ARGS...]
ns-kernel doctor [options]"""
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
