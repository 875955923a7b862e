"""Each kernel's private socket directory on the host: made 0700, removed without trace.

Under $XDG_RUNTIME_DIR/ns-kernel when usable, else /tmp/ns-kernel-UID; short, since a
Unix socket path must fit in 107 bytes.
"""
import os
import stat

from .errors import SetupError

FIX = "set Sandbox.socket_dir (--socket-dir) or $XDG_RUNTIME_DIR to a writable directory"
MAX_SOCKET_PATH = 107


def default_base():
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return os.path.join(runtime, "ns-kernel")
    return f"/tmp/ns-kernel-{os.getuid()}"


def _ensure_base(base):
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        info = os.lstat(base)
    except OSError as exc:
        raise SetupError("socket dir", "mkdir", exc.filename or base, exc.errno, FIX) from None
    # /tmp is shared: refuse a base someone else made (or a symlink planted to redirect us).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SetupError("socket dir", f"{base} is not a 0700 directory owned by uid "
                         f"{os.getuid()}", hint=f"remove it, or {FIX}")


def choose(base):
    """The path of a new socket dir (made later by create()), checked for length now."""
    base = os.path.abspath(base or default_base())
    return check_length(os.path.join(base, os.urandom(6).hex()))


def check_length(path):
    """`path` if the kernel's sockets in it fit a Unix socket path, else a SetupError."""
    if len(path) + len("/k-65535") > MAX_SOCKET_PATH:
        raise SetupError("socket dir", f"{path} is too long for Unix socket paths",
                         hint=f"use a directory under {MAX_SOCKET_PATH - 30} bytes: {FIX}")
    return path


def create(path, owner=None):
    """Make `path`, 0700, owned by `owner` (uid, gid) if given (root's sandbox)."""
    _ensure_base(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise SetupError("socket dir", "mkdir", path, exc.errno, FIX) from None
    if owner:
        try:
            os.chown(path, *owner)
        except OSError as exc:
            remove(path)
            raise SetupError("socket dir", f"chown {owner[0]}:{owner[1]}", path, exc.errno,
                             "that uid has no mapping here; pick another with --uid/--gid")
    return path


def remove(path):
    import shutil   # here only: it costs a warm client ~5 ms (bz2, lzma) before it connects
    shutil.rmtree(path, ignore_errors=True)
