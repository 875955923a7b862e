"""Each kernel's private socket directory on the host: made 0700, removed without trace.

They live in a base directory of the user's own, which also holds the warm template's
socket: $XDG_RUNTIME_DIR/ns-kernel when usable, else /tmp/ns-kernel-UID; short, since a
Unix socket path must fit in 107 bytes. A base is used only if it is a directory (not a
symlink) owned by the user that nobody else may enter: /tmp is everyone's, and another
user may have made /tmp/ns-kernel-UID first.
"""
import os
import stat

from . import connection
from .errors import SetupError
from .user import owner_hint

FIX = "set Sandbox.socket_dir (--socket-dir) or $XDG_RUNTIME_DIR to a writable directory"
MAX_SOCKET_PATH = 107


def default_base(environ=os.environ):
    """The base of a user's socket dirs and warm templates, for a process of `environ`."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return os.path.join(runtime, "ns-kernel")
    return f"/tmp/ns-kernel-{os.getuid()}"


def unsafe(info):
    """Why a base with this lstat() must not be used, or ''."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not {os.getuid()}"
    if info.st_mode & 0o077:
        return f"is open to other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def _make(base):
    """Make `base` (0700) unless it exists; why it is then not safely ours, or ''."""
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass            # not a directory: lstat says what it is
    except OSError as exc:
        raise SetupError("socket dir", "mkdir", exc.filename or base, exc.errno, FIX) from None
    try:
        return unsafe(os.lstat(base))
    except OSError as exc:
        raise SetupError("socket dir", "lstat", base, exc.errno, FIX) from None


def ensure_base(base):
    """Make `base` (0700) unless it exists; then a SetupError unless it is safely ours."""
    why = _make(base)
    if why:
        raise SetupError("socket dir", f"socket base {base}: {why}",
                         hint=f"another user or program made it; have it removed, or {FIX}")


def choose(base="", warn=None):
    """The path of a new socket dir (made later by create()), checked for length now:
    under `base` (Sandbox.socket_dir) if given, else under the user's own base.
    warn(line): how to say that the default base is not ours (default: stderr)."""
    base = os.path.abspath(base) if base else _user_base(warn)
    return check_length(os.path.join(base, os.urandom(6).hex()))


def _user_base(warn):
    """The default base; when it is not safely ours, a private dir of ours instead.

    Someone else's /tmp/ns-kernel-UID must not stop the user's kernels (refusing would give
    every other user of the machine a way to deny them service), so kernels go on in a
    0700 dir of the user's own under $TMPDIR (or /tmp), with a random name nobody could
    have made first, found again by its owner and mode at later starts (a restart must
    find its provisioner's dir again). The warm template stays on the default base, so
    warm kernels start cold meanwhile (warm.py). The line says what happened and how to
    end it."""
    base = default_base()
    why = _make(base)
    if not why:
        return base
    parent = os.environ.get("TMPDIR") or "/tmp"
    prefix = f"ns-kernel-{os.getuid()}-"
    try:
        names = sorted(name for name in os.listdir(parent) if name.startswith(prefix))
    except OSError as exc:
        raise SetupError("socket dir", "listdir", parent, exc.errno, FIX) from None
    private = next((os.path.join(parent, name) for name in names
                    if _ours(os.path.join(parent, name))), None)
    while private is None:
        private = os.path.join(parent, prefix + os.urandom(4).hex())
        try:
            os.mkdir(private, 0o700)
        except FileExistsError:
            private = None
        except OSError as exc:
            raise SetupError("socket dir", "mkdir", private, exc.errno, FIX) from None
    (warn or _stderr)(f"ns-kernel: socket base {base}: {why} (another user or program made "
                      f"it first; kernels use {private} instead: have it removed, or {FIX})")
    return private


def _ours(path):
    try:
        return not unsafe(os.lstat(path))
    except OSError:
        return False


def _stderr(line):
    import sys
    print(line, file=sys.stderr, flush=True)


def check_length(path):
    """`path` if the kernel's sockets in it fit a Unix socket path, else a SetupError."""
    if len(path) + len("/k-65535") > MAX_SOCKET_PATH:
        raise SetupError("socket dir", f"{path} is too long for Unix socket paths",
                         hint=f"use a directory under {MAX_SOCKET_PATH - 30} bytes: {FIX}")
    return path


def create(path, owner=None):
    """Make `path`, 0700; for root's sandbox (`owner`: its uid and gid), 0770 with the
    sandbox's group, so that the kernel can bind its sockets there while the dir stays
    root's: root writes the connection file in it, connects to the sockets and removes
    them without CAP_DAC_OVERRIDE, which a container may have dropped (docs/containers.md).
    Nobody else can enter it: its base is root's, 0700."""
    ensure_base(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise SetupError("socket dir", "mkdir", path, exc.errno, FIX) from None
    if owner:
        try:
            give(path, (-1, owner[1]), "socket dir")
            os.chmod(path, 0o770)
        except SetupError:
            remove(path)
            raise
    return path


def give(path, owner, step):
    """chown a dir made for root's sandbox to its uid and gid (`owner`; uid -1: keep it)."""
    try:
        os.chown(path, *owner)
    except OSError as exc:
        raise SetupError(step, f"chown {'' if owner[0] == -1 else owner[0]}:{owner[1]}", path,
                         exc.errno, owner_hint(exc.errno, owner)) from None


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def link_ipc_paths(info, socket_dir):
    """Point the paths an ipc client connects to (<ip>-<port>, for each channel of the
    connection info) at the kernel's sockets in socket_dir; return the links made. The
    provisioner's client needs none: its paths are the kernel's sockets."""
    links = []
    for name in connection.CHANNELS:
        path = f"{info['ip']}-{info[name]}"
        target = connection.socket_path(socket_dir, info[name])
        if path == target:
            continue
        try:
            if os.path.lexists(path) and not os.path.isfile(path):
                os.unlink(path)   # a stale socket of an earlier kernel
            os.symlink(target, path)
        except OSError as exc:
            unlink_ipc_paths(links, socket_dir)
            raise SetupError("connection", "link ipc socket", path, exc.errno,
                             "the connection file's ip must name a writable directory") from None
        links.append(path)
    return links


def unlink_ipc_paths(links, socket_dir):
    """The links to socket_dir's sockets (where an ipc client looks for them), unless the
    next kernel's launcher (a restart) has made them its own."""
    for path in links:
        try:
            if os.path.dirname(os.readlink(path)) == socket_dir:
                os.unlink(path)
        except OSError:
            pass


def remove(path):
    """Remove a socket dir and whatever its kernel left in it, in whatever modes (a dir it
    closed to its own uid, mode 000): every step by a directory fd, never following a
    symlink the kernel may have planted to send us elsewhere."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, DIR_FLAGS)
    except OSError:
        return
    try:
        _remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)


def _remove_entry(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)      # a file, socket or symlink: never followed
        return
    except IsADirectoryError:
        pass
    except OSError:
        return
    fd = _open_dir(dir_fd, name)
    if fd is None:
        return
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        for entry in names:
            _remove_entry(fd, entry)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass


def _open_dir(dir_fd, name):
    """An fd to read the dir `name`, made ours to empty first: a kernel may have closed
    its own dirs (mode 000 or 0500; of our own uid, for an ordinary user). By an O_PATH fd
    of that very dir, not by name, which the kernel could have swapped for a symlink."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
    except OSError:
        return None
    try:
        os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(path_fd)
