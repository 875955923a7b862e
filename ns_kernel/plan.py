"""The whole sandbox as one frozen value, and the pure function that builds it.

build_plan() takes the settings and facts about the host and returns a Plan: id maps,
mounts in the order they are made, hostname, environment, what to run. It touches
nothing, so it is tested without privileges; option conflicts are rejected here, before
any work starts.
"""
import enum
import fnmatch
import functools
import os
import re
import sys
from dataclasses import dataclass, field, make_dataclass

from . import seccomp
from .sizes import format_size, parse_size
from .errors import SetupError, moved
from .limittable import LIMITS
from .net import MODES
from .preload import IMPORT_ENV
from .syscalls import MountAttr

RO = MountAttr.MOUNT_ATTR_RDONLY | MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NODEV
RW = MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NODEV

# Shown read-only when present; the rest of / (other homes, /run, /var, /srv, /mnt) is absent.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
SOCKET_DIR_INSIDE = "/run/ns-kernel"
MAX_PTYS = 64          # per kernel: terminals, pexpect sessions, one per running `!cmd`
# In a home shown to the kernel, the non-dot entries a shell or desktop still runs as code
# (Debian's ~/.profile puts ~/bin on PATH): read-only.
HOME_CODE = ("bin",)
# The Landlock ABI the sandbox uses (seal.LINKS): ABI 1 (Linux 5.13-5.18) cannot grant a
# move between dirs, which any ruleset denies, and the seccomp filter stands in for it.
LANDLOCK_ABI = 2
SANDBOX_HOME = ".isolated-home"   # $HOME inside, when the real home is the notebook's folder


class Op(enum.Enum):
    BIND = "bind"          # host `source` at `dest`, then `attrs` on the whole tree
    TMPFS = "tmpfs"        # fresh tmpfs with `data` options, then `attrs`
    PROC = "proc"          # fresh proc for the new PID namespace
    SYSFS = "sysfs"        # fresh sysfs for the new net namespace, read-only
    DEVPTS = "devpts"      # private pty instance
    SYMLINK = "symlink"    # dest -> data
    DEVICE = "device"      # bind one host device node
    HIDE = "hide"          # empty read-only tmpfs over a path a bind would otherwise show
    SEAL = "seal"          # make dest read-only, not what is mounted below it


@dataclass(frozen=True)
class Mount:
    op: Op
    dest: str
    source: str = ""
    data: str = ""
    attrs: MountAttr = RW
    # a bind seen through an id map (MOUNT_ATTR_IDMAP): ((host uid, kernel uid), (host gid,
    # kernel gid)), the host's ids the files show as the kernel's (folder_idmap)
    idmap: tuple = None


@dataclass(frozen=True)
class IdMap:
    inside: int
    outside: int

    def line(self):
        return f"{self.inside} {self.outside} 1\n"


@dataclass(frozen=True)
class Host:
    """Facts about the machine and the caller, gathered once by Host.probe()."""
    uid: int
    gid: int
    home: str
    cwd: str
    environ: tuple
    python_paths: tuple
    symlinks: tuple = ()      # (path, target) of system dirs that are symlinks (merged /usr)
    missing: frozenset = frozenset()
    # Jupyter's runtime dir, /run/user/UID and ns-kernel's default socket base (the warm
    # template's socket, whatever Sandbox.socket_dir says): always hidden
    runtime_dirs: tuple = ()
    venv: str = ""            # this interpreter's venv (sys.prefix), if it runs in one
    venv_entries: tuple = ()  # (name, symlink target or "" for a dir, None for a file)
    home_entries: tuple = ()  # the same, of the real home
    data_home: str = ""       # $XDG_DATA_HOME, else ~/.local/share
    cwd_shared: bool = False  # cwd is writable by every user, as /tmp is
    homes: tuple = ()         # every user's own home
    config_paths: tuple = ()  # (path, exists): what the host side reads as configuration
    repos: tuple = ()         # real paths of the .git entries git on the host obeys (repos())
    # sys.path and PYTHONPATH entries that do not exist (yet), as real paths: a kernel that
    # may write where one lies could create it, and the next launcher would import from it
    unbuilt_paths: tuple = ()
    binds: tuple = ()         # (given, real path) of each of the admin's ro/rw binds
    landlock: int = 0         # Landlock's ABI version, 0 where Linux has none
    cwd_owner: tuple = ()     # (uid, gid) of the working directory
    initial_userns: bool = False  # the host's own user namespace, not a container's

    @classmethod
    def probe(cls, binds=(), writable=()):
        """binds: the admin's bind sources, resolved here once: what the plan mounts and
        open_sources compares against. writable: folders besides the working directory
        the kernel may write (--rw-bind, a shared home), searched for git repositories."""
        from jupyter_core.paths import jupyter_runtime_dir
        from .socketdir import default_base
        from .syscalls import landlock_abi
        links, missing = [], set()
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                links.append((path, os.readlink(path)))
            elif not os.path.isdir(path):
                missing.add(path)
        import pwd
        uid = os.getuid()
        # Real paths, as every source of a mount is (mount.open_sources compares).
        home = os.path.realpath(os.path.expanduser("~"))
        cwd = os.getcwd()
        venv = os.path.realpath(sys.prefix) if sys.prefix != sys.base_prefix else ""
        return cls(uid=uid, gid=os.getgid(), home=home, cwd=cwd,
                   environ=tuple(sorted(os.environ.items())), python_paths=python_paths(),
                   symlinks=tuple(links), missing=frozenset(missing),
                   runtime_dirs=(jupyter_runtime_dir(), f"/run/user/{uid}", default_base()),
                   venv=venv, venv_entries=_entries(venv) if venv else (),
                   home_entries=_entries(home) if os.path.isdir(home) else (),
                   cwd_shared=_shared(cwd),
                   homes=_homes(pwd.getpwall()),
                   config_paths=config_paths(),
                   repos=repos((cwd, *map(_real, writable)), hidden=(home,)),
                   unbuilt_paths=unbuilt_paths(),
                   binds=tuple((path, _real(path)) for path in binds),
                   landlock=landlock_abi(), cwd_owner=_owner(cwd),
                   initial_userns=initial_userns(),
                   data_home=os.path.realpath(os.environ.get("XDG_DATA_HOME")
                                              or os.path.join(home, ".local/share")))


def _real(path):
    try:
        return os.path.realpath(path)
    except OSError:     # a link swapped in or out while it was read (readlink: EINVAL)
        raise moved(path) from None


# How far below a folder the kernel may write its git repositories are looked for, and how
# many dirs are read at most: a notebook in the home (JupyterLab's default root) has the
# user's projects below it. Measured in docs/trust.md.
REPO_DEPTH = 3
REPO_SCAN_ENTRIES = 4000
NOT_SEARCHED = ("node_modules", "__pycache__", "site-packages")


class _Dir:
    """An open dir of the repository search, closed once its last subdir is opened."""

    def __init__(self, fd):
        self.fd, self.pending = fd, 0

    def release(self):
        self.pending -= 1
        if self.pending <= 0:
            os.close(self.fd)


def repos(roots, hidden=()):
    """What git on the host obeys in each root and up to REPO_DEPTH levels below, breadth
    first, until REPO_SCAN_ENTRIES entries are read: the .git entries (a dir, or a file,
    with the git dirs it names; not a link: the user's, it points where they chose). Dot
    entries are skipped only in `hidden` dirs (a home: the kernel never sees its own).
    Walked by handles, never following a link: a dir swapped for one meanwhile (another
    kernel's folder) is not searched, and open_sources refuses what moved."""
    found, todo, read = [], [], 0
    for root in roots:
        # The working directory as it is (".": no name looked up), as open_sources takes it.
        todo.append((None, "." if root == os.getcwd() else root, root, 0))
    try:
        while todo and read < REPO_SCAN_ENTRIES:
            parent, name, path, depth = todo.pop(0)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=parent.fd if parent else None)
            except OSError:
                continue
            finally:
                if parent:
                    parent.release()
            here = _Dir(fd)
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        read += 1
                        if entry.name == ".git" and not entry.is_symlink():
                            found.append(f"{path}/.git")
                            if entry.is_file(follow_symlinks=False):
                                found += _git_dirs(fd, path)
                        elif (depth < REPO_DEPTH and entry.name not in NOT_SEARCHED
                              and not (path in hidden and entry.name.startswith("."))
                              and entry.is_dir(follow_symlinks=False)):
                            here.pending += 1
                            todo.append((here, entry.name, f"{path}/{entry.name}", depth + 1))
            except OSError:
                pass
            here.pending += 1       # its own turn: closed now unless subdirs wait
            here.release()
    finally:
        for parent, _, _, _ in todo:
            if parent:
                parent.release()
    return tuple(sorted(set(found)))


def _git_dirs(dir_fd, path):
    """The git dir that <path>/.git (a file, read through dir_fd) names (`gitdir: X`: git
    init --separate-git-dir, a worktree, a submodule) and the common dir that one names
    (`commondir`), as real paths, where they are dirs: git on the host reads its config
    and hooks there."""
    dirs, name, prefix = [], ".git", "gitdir: "
    for _ in range(2):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                text = os.read(fd, 4096).decode(errors="replace").splitlines()
            finally:
                os.close(fd)
        except OSError:
            break
        if not text or not text[0].startswith(prefix):
            break
        path = os.path.realpath(os.path.join(path, text[0][len(prefix):]))
        if not os.path.isfile(os.path.join(path, "HEAD")):
            break       # not a git dir, as git itself would conclude
        dirs.append(path)
        # The common dir is named relative to the git dir, in its `commondir` file.
        dir_fd, name, prefix = None, os.path.join(path, "commondir"), ""
    return dirs


def _owner(path):
    info = os.stat(path)
    return info.st_uid, info.st_gid


def initial_userns():
    """Whether this is the host's own user namespace (all ids mapped to themselves), where
    root may make idmapped mounts of the host's filesystems; a container's is not."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _homes(users):
    """The homes that are someone's own (owned by their user: not /usr/games, /bin, ...)."""
    homes = set()
    for user in users:
        try:
            if user.pw_dir not in ("", "/") and os.stat(user.pw_dir).st_uid == user.pw_uid:
                homes.add(user.pw_dir)
        except OSError:
            pass
    return tuple(sorted(homes))


def _shared(path):
    """Writable by every user and sticky, as /tmp, /var/tmp and /dev/shm are."""
    import stat
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_ISVTX and mode & stat.S_IWOTH)


def config_paths():
    """Where the host side reads configuration or code that a kernel must never write:
    Jupyter's config and data paths (kernelspecs), IPython's profiles, the user site."""
    import site
    from jupyter_core.paths import jupyter_config_path, jupyter_path
    ipython = os.environ.get("IPYTHONDIR") or os.path.expanduser("~/.ipython")
    paths = {*jupyter_config_path(), *jupyter_path(), ipython, site.getuserbase()}
    return tuple(sorted((p, os.path.exists(p)) for p in map(os.path.realpath, paths)
                        if os.path.isabs(p)))


def _entries(path):
    entries = []
    for entry in os.scandir(path):
        if entry.is_symlink():
            entries.append((entry.name, os.readlink(entry.path)))
        else:
            entries.append((entry.name, "" if entry.is_dir() else None))
    return tuple(sorted(entries, key=lambda e: e[0]))


def _search_path():
    """Every dir this interpreter imports from, or a later launcher would: sys.path, and
    PYTHONPATH's entries, as a cold launcher has them on sys.path (an empty entry is the
    current folder): a warm template's launcher runs with the template's sys.path, which
    lacks the folder the template was started in."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *filter(None, sys.path)}
    if os.environ.get("PYTHONPATH"):
        paths.update(map(os.path.abspath, os.environ["PYTHONPATH"].split(os.pathsep)))
    return paths


def python_paths():
    """Where this interpreter and its packages live: all of it must be readable inside."""
    paths = (os.path.realpath(p) for p in _search_path() if os.path.exists(p))
    # "/" would show the whole host; it only gets here as `python -m` run from /.
    return tuple(sorted(p for p in paths if p != "/"))


def unbuilt_paths():
    """The search path's entries that do not exist, as real paths (what exists of them
    resolved): where a kernel must not be able to create one."""
    return tuple(sorted({os.path.realpath(p) for p in _search_path() if not os.path.exists(p)}))


def _limits_from_config(cls, sandbox):
    return cls(**{limit.name: limit.parse(getattr(sandbox, limit.name)) for limit in LIMITS},
               backend=sandbox.limits_backend, best_effort=sandbox.best_effort)


# One field per limit (memory: bytes, pids, cpus: cores; each 0 = none), from its row
# (limittable.LIMITS), then how they are enforced.
Limits = make_dataclass("Limits", [
    *((limit.name, type(limit.none), field(default=limit.none)) for limit in LIMITS),
    # as configured; once decided (limits.decide), the one in force
    ("backend", str, field(default="auto")),
    ("best_effort", bool, field(default=False)),
    # what the backend in force cannot enforce (best_effort)
    ("skipped", tuple, field(default=())),
], frozen=True, namespace={"__module__": __name__,
                           "from_config": classmethod(_limits_from_config)})


@dataclass(frozen=True)
class Plan:
    uid_map: IdMap
    gid_map: IdMap
    uid: int                  # the kernel's uid and gid, as seen inside
    gid: int
    drop_groups: bool         # host root: its supplementary groups must not follow it in
    hostname: str
    network: str
    mounts: tuple
    argv: tuple
    env: tuple
    cwd: str
    socket_dir: str           # host path of the private socket dir
    limits: Limits = field(default_factory=Limits)
    state_dirs: tuple = ()    # host dirs that outlive the kernel, made before the start
    package_paths: tuple = () # sys.path entries (inside) of the packages the user installs
    discarded: tuple = ()     # (dir, skip dot entries): what vanishes with the sandbox
    sockets: tuple = ()       # the kernel's socket names in the socket dir, once bound
    seccomp: object = None    # the seccomp.Filter loaded last (seal.py), None for none
    allow_userns: bool = False  # let the kernel make namespaces of its own
    # dirs (inside) where the kernel may make links and FIFOs, which Landlock denies it
    # everywhere else (seal.py); None: Linux has no Landlock, the seccomp filter denies them
    links_in: tuple = None
    egress: object = None     # network 'proxy': where its proxy may go (proxy.Policy)


def under(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def own_filesystems(tmp_opt, network):
    """The sandbox's own filesystems, in mount order, as a table (systemd-nspawn keeps
    its like this): nothing here comes from the host but a few device nodes."""
    tmp = f"mode=1777{tmp_opt}"
    return [
        Mount(Op.TMPFS, "/tmp", data=tmp),
        Mount(Op.TMPFS, "/var/tmp", data=tmp),
        Mount(Op.TMPFS, "/dev", data="mode=0755,size=64k", attrs=MountAttr.MOUNT_ATTR_NOSUID),
        *(Mount(Op.DEVICE, f"/dev/{name}", source=f"/dev/{name}") for name in DEVICES),
        Mount(Op.SYMLINK, "/dev/fd", data="/proc/self/fd"),
        Mount(Op.SYMLINK, "/dev/stdin", data="/proc/self/fd/0"),
        Mount(Op.SYMLINK, "/dev/stdout", data="/proc/self/fd/1"),
        Mount(Op.SYMLINK, "/dev/stderr", data="/proc/self/fd/2"),
        Mount(Op.SYMLINK, "/dev/ptmx", data="pts/ptmx"),
        # max: the ptys of all devpts instances come from one host-wide pool
        # (kernel.pty.max); a kernel must not be able to take them all from the others.
        Mount(Op.DEVPTS, "/dev/pts", data=f"newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}"),
        Mount(Op.TMPFS, "/dev/shm", data=tmp),
        Mount(Op.PROC, "/proc", attrs=RW | MountAttr.MOUNT_ATTR_NOEXEC),
        # A fresh sysfs shows its network namespace's devices, and only that namespace's
        # owner may mount it: with the host's network, there is none.
        *([Mount(Op.SYSFS, "/sys", attrs=RO | MountAttr.MOUNT_ATTR_NOEXEC)]
          if MODES[network].sysfs else []),
    ]


@dataclass
class _Tree:
    """The mounts as build_plan makes them, and what it must know of them on the way."""
    mounts: list = field(default_factory=list)
    visible: list = field(default_factory=list)     # host paths shown inside: a hidden
    #                                                 path under one gets covered
    writable: list = field(default_factory=list)    # nothing the host side runs or reads
    #                                                 as configuration may be in these
    read_only: list = field(default_factory=list)   # read-only views below writable ones
    seals: list = field(default_factory=list)       # read-only last, with all below mounted
    state_dirs: list = field(default_factory=list)  # host dirs that outlive the kernel

    def writable_above(self, path):
        """A writable folder that holds path (or is it), None if none."""
        return next((w for w in self.writable if under(path, w)), None)

    def covering(self, path):
        """The writable or read-only folder nearest above path, None if none."""
        return max((p for p in (*self.writable, *self.read_only) if under(path, p)), key=len,
                   default=None)


def build_plan(sandbox, host, argv, socket_dir, kernel_id="", seccomp_profile=None,
               limits=None, sockets=()):
    """Return the Plan for running argv in a sandbox configured by `sandbox` on `host`;
    seccomp_profile: the seccomp.Filter read from the file Sandbox.seccomp names, if any;
    limits: the Limits with the backend in force (limits.decide), else as configured;
    sockets: the kernel's socket names in the socket dir (none for a command)."""
    cwd = os.path.normpath(host.cwd)
    check_cwd(cwd, host)
    uid, gid = identity(sandbox, host)
    home = host.home
    state = os.path.join(sandbox.state_dir or os.path.join(
        host.data_home or os.path.join(home, ".local/share"), "ns-kernel"), sandbox.kernel_name)
    tmp = parse_size(sandbox.tmp_size)
    tmp_opt = f",size={format_size(tmp)}" if tmp else ""
    tree = _Tree()
    # In order: the host's system dirs, read-only; the sandbox's own filesystems; the home;
    # the interpreter; the folder and the admin's binds; read-only views of what the host
    # reads below them; the socket dir; covers over other kernels' secrets; seals; pins.
    packages = packages_mount(sandbox, host, state, uid, gid, tmp_opt, tree)
    system_mounts(host, tree)
    tree.mounts += own_filesystems(tmp_opt, sandbox.network)
    ro_binds, rw_binds = admin_binds(sandbox, host)
    tree.writable += rw_binds
    kernel_home = home_mounts(sandbox, host, cwd, uid, gid, tmp_opt, state, tree)
    if cwd != home:
        tree.writable.insert(0, cwd)
    check_state_dirs(tree)
    below_writable = interpreter_mounts(host, cwd, packages, tree)
    folder_mounts(cwd, home, ro_binds, rw_binds, tree,
                  folder_idmap(sandbox, host, cwd, uid, gid))
    for path in below_writable:     # e.g. the notebook folder's own .venv
        tree.mounts += python_mounts(path, host, packages)
        tree.visible.append(path)
        tree.read_only.append(path)
    host_read_mounts(host, tree)
    tree.mounts.append(Mount(Op.BIND, SOCKET_DIR_INSIDE, source=socket_dir, attrs=RW))
    hide_mounts(sandbox, host, cwd, socket_dir, tree)
    mounts = pin_ancestors([*tree.mounts, *tree.seals], tree.writable)

    env, egress = kernel_env(dict(host.environ), sandbox, kernel_home), None
    if MODES[sandbox.network].offline_hint:
        # No network to come back: pip's retries (about 9 s) would only delay its error.
        env.setdefault("PIP_RETRIES", "0")
    if MODES[sandbox.network].proxy:
        from .proxy import Policy
        egress = Policy.parse(sandbox.proxy_allow, sandbox.proxy_deny)
        env.update(proxy_env())
    elif sandbox.proxy_allow or sandbox.proxy_deny:
        raise SetupError("plan", "--allow/--deny without --network proxy", hint=(
            f"they say where the proxy may go; this kernel's network is {sandbox.network}"))
    package_paths = ()
    if host.venv:
        package_paths, env = with_packages(env, host.venv)
    return Plan(
        uid_map=IdMap(uid, uid), gid_map=IdMap(gid, gid), uid=uid, gid=gid,
        drop_groups=host.uid == 0,
        hostname=f"{sandbox.hostname_prefix}-{(kernel_id or os.urandom(4).hex())[:8]}",
        network=sandbox.network, mounts=tuple(mounts), argv=tuple(argv),
        env=tuple(sorted(env.items())), cwd=cwd, socket_dir=socket_dir,
        limits=limits or Limits.from_config(sandbox), state_dirs=tuple(tree.state_dirs),
        sockets=tuple(sockets),
        package_paths=package_paths,
        seccomp=seccomp_filter(sandbox, seccomp_profile, [*tree.writable, *tree.state_dirs],
                               no_links=host.landlock < LANDLOCK_ABI),
        links_in=(links_in(sandbox, kernel_home, tree.writable)
                  if host.landlock >= LANDLOCK_ABI else None),
        allow_userns=sandbox.allow_userns, egress=egress,
        discarded=(("/tmp", False), ("/var/tmp", False), ("/dev/shm", False),
                   *([(home, True)] if sandbox.home == "private" else []),
                   *((path, False) for path in package_paths
                     if packages and packages.op is Op.TMPFS)))


def identity(sandbox, host):
    """The kernel's uid and gid, the same inside as outside: the caller's, or (host root:
    never root inside) Sandbox.sandbox_uid/gid."""
    if host.uid != 0:
        return host.uid, host.gid
    if sandbox.sandbox_uid == 0 or sandbox.sandbox_gid == 0:
        raise SetupError("plan", "Sandbox.sandbox_uid/sandbox_gid = 0", hint=(
            "host root is never root inside; pick an unprivileged uid such as 65534"))
    return sandbox.sandbox_uid, sandbox.sandbox_gid


def packages_mount(sandbox, host, state, uid, gid, tmp_opt, tree):
    """What `%pip install` adds to a venv kernel (None outside one): kept with a persistent
    home, else it goes with the kernel as a private home does (nothing one kernel leaves
    may reach the next: graders and services run many people's code as one user)."""
    if not host.venv:
        return None
    if sandbox.home == "persistent":
        tree.state_dirs.append(f"{state}/packages")
        return Mount(Op.BIND, f"{host.venv}/{PACKAGES}", source=tree.state_dirs[-1], attrs=RW)
    return Mount(Op.TMPFS, f"{host.venv}/{PACKAGES}",
                 data=f"mode=0700,uid={uid},gid={gid}{tmp_opt}")


def system_mounts(host, tree):
    """The host's system dirs, read-only (merged-/usr links as links); the rest of / (other
    homes, /run, /var, /srv, /mnt) is absent."""
    for path, target in host.symlinks:
        tree.mounts.append(Mount(Op.SYMLINK, path, data=target))
    for path in SYSTEM_DIRS:
        if path not in host.missing and path not in dict(host.symlinks):
            tree.mounts.append(Mount(Op.BIND, path, source=path, attrs=RO))
            tree.visible.append(path)


def admin_binds(sandbox, host):
    """The admin's --ro-bind and --rw-bind sources, as real paths: a link on the way (a
    kernel may write the folder one lies in) is resolved once, in Host.probe, and
    open_sources compares."""
    for path in (*sandbox.ro_binds, *sandbox.rw_binds):
        if not os.path.isabs(path):
            raise SetupError("plan", "bind", path, hint="bind paths must be absolute")
    for given, real in host.binds:
        if real == "/":
            raise SetupError("plan", "bind", given, hint=(
                "it is / or a link to it, which would show the whole host; bind the "
                "folder itself"))
    binds = dict(host.binds)
    return ([binds.get(p, os.path.normpath(p)) for p in paths]
            for paths in (sandbox.ro_binds, sandbox.rw_binds))


def home_mounts(sandbox, host, cwd, uid, gid, tmp_opt, state, tree):
    """The real home where it is shown (--home readonly/shared, or the notebook folder is
    the home): its own files, never its dot entries (keys, tokens, the settings of shells,
    git, Jupyter, IPython), which the kernel can neither read nor create. Then $HOME: a
    tmpfs (private) or a state dir (persistent), at ~/.isolated-home where the real home
    is shown. Returns $HOME's path inside."""
    home = kernel_home = host.home
    if sandbox.home in ("readonly", "shared") or cwd == home:
        own = RO if sandbox.home == "readonly" and cwd != home else RW
        shown = home_entries(home, host.home_entries, own)
        tree.mounts += shown
        tree.seals.append(Mount(Op.SEAL, home))
        tree.visible += [m.dest for m in shown[1:]]
        tree.writable += [m.dest for m in shown if m.op is Op.BIND and m.attrs == RW]
        if sandbox.home in ("persistent", "private"):
            kernel_home = f"{home}/{SANDBOX_HOME}"
    if sandbox.home == "private":
        tree.mounts.append(Mount(Op.TMPFS, kernel_home,
                                 data=f"mode=0700,uid={uid},gid={gid}{tmp_opt}"))
    elif sandbox.home == "persistent":
        tree.state_dirs.append(f"{state}/home")
        tree.mounts.append(Mount(Op.BIND, kernel_home, source=tree.state_dirs[-1], attrs=RW))
    return kernel_home


def check_state_dirs(tree):
    """The kernel's home and packages on the host may not lie where a kernel may write
    (Sandbox.state_dir or $XDG_DATA_HOME in a notebook folder): what a kernel leaves in its
    home, links and FIFOs included, would be in a folder the host reads."""
    for path in tree.state_dirs:
        inside = tree.writable_above(path)
        if inside:
            raise SetupError("plan", f"state dir {path}", hint=(
                f"it lies in {inside}, which the kernel may write, and the host reads it; set "
                "Sandbox.state_dir (or $XDG_DATA_HOME) to a folder outside it"))


def interpreter_mounts(host, cwd, packages, tree):
    """The interpreter's paths, read-only, where nothing shows them yet. One the kernel
    may write, or could create, is refused: the next launcher would import from it on the
    host. Returns those below a writable folder, mounted read-only once that folder is."""
    home = host.home
    for path in host.unbuilt_paths:
        inside = tree.writable_above(path)
        if inside:
            raise SetupError("plan", f"sys.path entry {path} does not exist", hint=(
                f"it lies in {inside}, which the kernel may write: the kernel could create "
                "it, and the next launcher would import what it put there outside the "
                "sandbox; create it, or take it out of PYTHONPATH"))
    below_writable = []
    for path in host.python_paths:
        if path in tree.writable or (cwd == home and path == home):
            raise SetupError("plan", f"sys.path entry {path}", hint=(
                "the kernel may write it, and the next launcher would import what it put "
                "there outside the sandbox; take it (or an empty entry, which means the "
                "current folder) out of PYTHONPATH, and run `python -P -m ns_kernel`"))
        if under(home, path):
            # Shown read-only it would show the home's keys and settings.
            raise SetupError("plan", f"sys.path entry {path}", hint=(
                f"it holds the home {home}, which the kernel must not see whole; take it "
                "(or an empty entry, which means the current folder) out of PYTHONPATH"))
        if tree.writable_above(path):
            below_writable.append(path)     # read-only on top of it, below
        elif path == host.venv or not any(under(path, v) for v in tree.visible):
            # After the tmpfs mounts: a venv under /tmp or a private $HOME stays visible.
            tree.mounts += python_mounts(path, host, packages)
            tree.visible.append(path)
    return below_writable


def folder_mounts(cwd, home, ro_binds, rw_binds, tree, idmap=None):
    """The folder (unless shown with the home, without its dot entries; through `idmap`,
    if any) and the admin's binds, each after any of them it lies in: a --ro-bind inside
    the folder stays read-only, a folder inside a --rw-bind stays shown."""
    shown = [*((path, RO) for path in ro_binds), *((path, RW) for path in rw_binds),
             *([(cwd, RW)] if cwd != home else [])]
    for path, attrs in sorted(shown, key=lambda bind: bind[0].rstrip("/").count("/")):
        tree.mounts.append(Mount(Op.BIND, path, source=path, attrs=attrs,
                                 idmap=idmap if path == cwd else None))
        tree.visible.append(path)


# Folders whose files root's kernels never get to write as their owner's (folder_idmap):
# the system's own, where a file root owns is one the host runs or obeys as root.
NEVER_IDMAPPED = (*SYSTEM_DIRS, "/boot", "/var", "/run")


def folder_idmap(sandbox, host, cwd, uid, gid):
    """The id map through which root's kernel sees its folder (None: as it is). Started
    by host root, a kernel runs as Sandbox.sandbox_uid (never root), which could not
    write the folder root (or another user) owns: nbgrader's autograded folders, a
    notebook that saves its results. Through the map, the folder owner's files show as
    the kernel's, and what the kernel makes is the owner's on the host, as a kernel of
    the owner's own would have it; only in that folder. Only when asked for
    (Sandbox.idmap_folder: every file the kernel makes there is root's on the host, which
    git and other tools root runs there would obey). Not for a folder of the system's
    (NEVER_IDMAPPED), nor any home or its settings (a dot entry: ~/.ssh, ~/.bashrc), the
    homes taken from the user database, not from $HOME (which sudo -E or a service may
    set to anything); nor without the default seccomp filter, which keeps setuid and
    setgid bits off the files (they would be root's on the host); nor for root of a
    container, whose mounts only the host's root may map."""
    if not sandbox.idmap_folder or host.uid != 0 or not host.initial_userns:
        return None
    if not host.cwd_owner or host.cwd_owner[0] == uid or sandbox.seccomp != "default":
        return None
    for home in {host.home, *host.homes}:
        if cwd == home or (under(cwd, home)
                           and cwd[len(home):].lstrip("/").startswith(".")):
            return None
    if any(under(cwd, d) for d in NEVER_IDMAPPED):
        return None
    return ((host.cwd_owner[0], uid), (host.cwd_owner[1], gid))


def host_read_mounts(host, tree):
    """Read-only views of what the host reads below a writable folder: git repositories
    (what git obeys in one is more than hooks and config: commondir, config.worktree,
    modules/*/config, info/attributes ..., and names that do not exist yet could not be
    covered: the whole of it), Jupyter's and IPython's settings (one that does not exist
    yet is refused: the kernel would create it)."""
    for git in host.repos:
        # Not one that holds a writable folder (a kernel's `.git` file may name `.`): that
        # would make the folder read-only for every later kernel.
        if tree.covering(git) in tree.writable and not any(under(w, git) for w in tree.writable):
            tree.mounts.append(Mount(Op.BIND, git, source=git, attrs=RO))
            tree.read_only.append(git)
    for path, exists in host.config_paths:
        covering = tree.covering(path)
        if covering not in tree.writable:
            continue
        if not exists:
            raise SetupError("plan", f"{path} would be the kernel's to create", hint=(
                f"it lies in {covering}, which the kernel may write, and Jupyter or IPython "
                "on the host would read it as configuration; create it, or run notebooks "
                "from another folder"))
        tree.mounts.append(Mount(Op.BIND, path, source=path, attrs=RO))
        tree.read_only.append(path)


def hide_mounts(sandbox, host, cwd, socket_dir, tree):
    """Other kernels' connection files and sockets (Jupyter's runtime dir, ns-kernel's
    socket base), and what --hide names: covered wherever a bind shows them."""
    for path in (*host.runtime_dirs, os.path.dirname(socket_dir), *sandbox.hide):
        path = os.path.normpath(path)
        if under(cwd, path):
            raise SetupError("plan", "working directory", cwd, hint=(
                f"it lies inside {path}, which holds other kernels' secrets; "
                "run notebooks from another folder"))
        if any(under(path, v) for v in tree.visible):
            tree.mounts.append(Mount(Op.HIDE, path, data="mode=0755,size=4k", attrs=RO))


def links_in(sandbox, kernel_home, writable):
    """Where the kernel may make links and FIFOs (seal.LINKS): its own filesystems, where
    nothing on the host reads them. Landlock grants a right on a whole tree, binds below
    included: a dir that holds a folder the host reads (a notebook folder in /tmp) is
    left out."""
    own = ("/tmp", "/var/tmp", "/dev/shm",
           *([kernel_home] if sandbox.home in ("persistent", "private") else []))
    return tuple(d for d in own if not any(under(w, d) for w in writable))


def seccomp_filter(sandbox, profile, writable, no_links=False):
    """no_links: the filter must deny symlink(2) (Linux without Landlock)."""
    if no_links and sandbox.seccomp != "default":
        raise SetupError("plan", f"Sandbox.seccomp = {sandbox.seccomp} on a Linux without "
                         "Landlock", hint=(
            "nothing else would stop the kernel making links in the notebook folder, which "
            "the Jupyter server follows out of it; use --seccomp default (it denies "
            "symlinks), or a Linux with Landlock (5.13+, lsm=...,landlock)"))
    if sandbox.seccomp == "off":
        return None
    if sandbox.seccomp == "default":
        return seccomp.default_filter(sandbox.allow_userns, no_links)
    inside = next((w for w in writable if under(profile.source, w)), None)
    if inside:
        raise SetupError("plan", f"seccomp profile {sandbox.seccomp}", hint=(
            f"it lies in {inside}, which the kernel may write: its next start would load "
            "the kernel's own filter; keep profiles where only you or the admin write"))
    return profile


PACKAGES = "user"     # <venv>/user inside: where `%pip install` puts what the user adds
URL_CREDENTIALS = re.compile(r"://[^/@\s]+@")     # https://user:secret@index/..., git+https://token@


def check_cwd(cwd, host):
    """Refuse a notebook folder whose sharing read-write would give the kernel what is not
    the user's to give, or what the host side reads as configuration."""
    if cwd == "/":
        raise SetupError("plan", "working directory", "/", hint=(
            "sharing / read-write would expose the whole host; start Jupyter from the "
            "notebook's folder"))
    if host.cwd_shared:
        raise SetupError("plan", "working directory", cwd, hint=(
            "every user may write it (as /tmp); the kernel would share it with all of "
            "them: start Jupyter from a folder of your own, e.g. ~/notebooks"))
    held = [h for h in host.homes if h != cwd and under(h, cwd)]
    if held:
        raise SetupError("plan", "working directory", cwd, hint=(
            f"it holds {held[0]}{' and other homes' if len(held) > 1 else ''}, with "
            "their keys and settings; start Jupyter from your home or a folder in it"))
    for path, _ in host.config_paths:
        check_config_dir(cwd, path)


def check_config_dir(cwd, path):
    """Refuse a notebook folder that lies in a dir the host side reads configuration from
    (real paths): the kernel would write what the next start obeys."""
    if under(cwd, path):
        raise SetupError("plan", "working directory", cwd, hint=(
            f"it lies in {path}, which Jupyter or IPython on the host reads as "
            "configuration; run notebooks from another folder"))


def home_entries(home, entries, attrs):
    """A tmpfs at home with the real home's non-dot entries on it (`attrs`; HOME_CODE
    read-only); the caller seals it read-only once all its mounts are made."""
    mounts = [Mount(Op.TMPFS, home, data="mode=0755,size=64k")]
    for name, target in entries:
        if name.startswith("."):
            continue
        if target:
            mounts.append(Mount(Op.SYMLINK, f"{home}/{name}", data=target))
        else:
            mounts.append(Mount(Op.BIND, f"{home}/{name}", source=f"{home}/{name}",
                                attrs=RO if name in HOME_CODE else attrs))
    return mounts


def pin_ancestors(mounts, writable):
    """Each dir between a writable bind and a mount below it, bound onto itself right
    after that bind: Linux refuses to rename or remove a mount point, but lets a kernel
    rename a dir that merely holds one (taking the read-only mount with it) and make a
    fresh one in its place, which the host side then reads by the old name."""
    roots = {m.dest: m for m in mounts if m.op is Op.BIND and m.dest in writable}
    pins = {}
    for m in mounts:
        # A writable bind below another too (the notebook folder in a --rw-bind, or in an
        # entry of a shared home): what the host reads below it is pinned from the top.
        root = max((r for r in roots if m.dest != r and under(m.dest, r)), key=len, default=None)
        if root is None:
            continue
        parent = os.path.dirname(m.dest)
        while parent != root:
            pins.setdefault(root, set()).add(parent)
            parent = os.path.dirname(parent)
    mounted = {m.dest for m in mounts}
    out = []
    for m in mounts:
        out.append(m)
        if m.op is Op.BIND and roots.get(m.dest) is m:
            out += [Mount(Op.BIND, path, source=path, attrs=m.attrs, idmap=m.idmap)
                    for path in sorted(pins.get(m.dest, ())) if path not in mounted]
    return out


def python_mounts(path, host, packages):
    """The read-only view of one of the interpreter's paths. The venv itself gets a
    skeleton instead: its entries read-only, and `packages` (a mount) at <venv>/user, so
    that pip installs there (PIP_PREFIX, with_packages) and, the place being inside the
    environment, also upgrades and uninstalls what it put there."""
    if path != host.venv:
        return [Mount(Op.BIND, path, source=path, attrs=RO)]
    if PACKAGES in dict(host.venv_entries):
        raise SetupError("plan", f"{path}/{PACKAGES} exists", hint=(
            "the venv has an entry where ns-kernel puts the packages a kernel installs; "
            "rename it"))
    mounts = [Mount(Op.TMPFS, path, data="mode=0755,size=64k")]
    for name, target in host.venv_entries:
        if target:
            mounts.append(Mount(Op.SYMLINK, f"{path}/{name}", data=target))
        else:
            mounts.append(Mount(Op.BIND, f"{path}/{name}", source=f"{path}/{name}", attrs=RO))
    return [*mounts, packages, Mount(Op.SEAL, path)]


def with_packages(env, venv):
    """The sys.path entries of <venv>/user, and the environment that puts them first and
    sends pip's installs there."""
    import sysconfig
    prefix = f"{venv}/{PACKAGES}"
    paths = sysconfig.get_paths(sysconfig.get_preferred_scheme("prefix"),
                                vars={"base": prefix, "platbase": prefix})
    sites = tuple(dict.fromkeys((paths["purelib"], paths["platlib"])))
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([*sites, *filter(None, [env.get("PYTHONPATH")])])
    env["PIP_PREFIX"] = prefix
    env["PATH"] = os.pathsep.join([paths["scripts"], *filter(None, [env.get("PATH")])])
    return sites, env


def proxy_env():
    """What points the kernel's clients (pip, conda, requests, urllib, httpx, curl, git) at
    its proxy: both cases, since curl reads only the lower and others only the upper. Its
    own loopback (a server the notebook starts) stays direct."""
    from .proxy import PORT
    env = {"http_proxy": f"http://127.0.0.1:{PORT}", "no_proxy": "localhost,127.0.0.1,::1"}
    env["https_proxy"] = env["all_proxy"] = env["http_proxy"]
    return {**env, **{name.upper(): value for name, value in env.items()}}


@functools.lru_cache(maxsize=64)
def env_pattern(patterns):
    """Shell-style patterns (a tuple), matched case-insensitively as fnmatch would match
    NAME.upper() with each pattern.upper(), as one compiled regex. Compiling the default
    lists took ~5 ms a start: the warm template compiles them once, for every fork."""
    if not patterns:
        return re.compile(r"(?!)")     # matches nothing
    return re.compile("|".join(fnmatch.translate(p.upper()) for p in patterns))


def kernel_env(environ, sandbox, home):
    """The kernel's environment (a dict): of the caller's, what env_allow names, minus
    what env_deny names and credentials in URLs; env_keep passes as it is."""
    keep, allow, deny = (env_pattern(tuple(patterns))
                         for patterns in (sandbox.env_keep, sandbox.env_allow, sandbox.env_deny))

    def passes(name, value):
        name = name.upper()
        if keep.match(name):
            return True
        return allow.match(name) and not deny.match(name) and not URL_CREDENTIALS.search(value)
    env = {k: v for k, v in environ.items() if passes(k, v)}
    env["HOME"] = home
    env.update(IMPORT_ENV)
    env.pop("TMPDIR", None)
    return env
