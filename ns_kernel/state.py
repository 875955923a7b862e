"""What outlives a kernel: each kernelspec name's state dir on the host.

  <state_dir>/<kernel_name>/home       $HOME inside, with --home persistent (the default)
  <state_dir>/<kernel_name>/packages   what `%pip install` adds to a venv kernel's
                                       environment (plan.py mounts it at <venv>/user)

A kernel writes inside these, so the host side only makes them and hands them to the
sandbox as bind sources: it never reads, runs or follows what is in them.
"""
import os
import stat

from .errors import SetupError
from .socketdir import give

FIX = "set Sandbox.state_dir to a directory you own, or remove what is in the way"


def prepare(paths, owner=None):
    """Make each path (and its parents) a 0700 directory, the leaves owned by `owner`
    (uid, gid; root's sandbox). A symlink or another user's directory on the way is
    refused: it would send the kernel's home somewhere else."""
    uid = os.getuid()
    for path in paths:
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SetupError("state dir", "mkdir", exc.filename or parent, exc.errno, FIX) from None
        _check(parent, uid)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            _check(path, owner[0] if owner else uid)    # made by an earlier kernel?
            continue
        except OSError as exc:
            raise SetupError("state dir", "mkdir", path, exc.errno, FIX) from None
        if owner:
            give(path, owner, "state dir")


def _check(path, uid):
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise SetupError("state dir", "lstat", path, exc.errno, FIX) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        raise SetupError("state dir", f"{path} is not a directory owned by uid {uid}",
                         hint=FIX)
