"""The socket dirs' base is never one another user (or anyone but us) made, and nobody can
stop kernels by making it first; what a kernel leaves in its socket dir goes with it.
Real kernels, on the argv path and through the provisioner."""
import asyncio
import os
import stat

import pytest
from jupyter_client.manager import AsyncKernelManager

from conftest import start_kernel, stop_kernel, write_spec

ARGV = write_spec("isolated-python-base")
PROVISIONER = write_spec("isolated-python-base-provisioner", provisioner=True)
OTHER_UID = 12345


def private_dirs(tmpdir):
    return sorted(name for name in os.listdir(tmpdir)
                  if name.startswith(f"ns-kernel-{os.getuid()}-"))


def start_both(workdir, log):
    """A kernel on the argv path, then one through the provisioner (their launchers'
    stderr to log); the provisioner's socket dir."""
    k = start_kernel(workdir, kernel_name=ARGV, stderr=log)
    try:
        assert k.value("__import__('os').getpid()") == 2
    finally:
        stop_kernel(k)

    async def provisioned():
        km = AsyncKernelManager(kernel_name=PROVISIONER)
        await km.start_kernel(cwd=workdir, stderr=log)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            return km.provisioner.kernel_socket_dir
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    return asyncio.run(provisioned())


def unsafe_bases():
    made = {
        "symlink": lambda base, tmp: os.symlink(tmp, base),
        "open to others": lambda base, tmp: (os.mkdir(base), os.chmod(base, 0o777)),
    }
    if os.getuid() == 0:
        made["another user's"] = lambda base, tmp: (os.mkdir(base, 0o700),
                                                    os.chown(base, OTHER_UID, OTHER_UID))
    return made


@pytest.mark.parametrize("how", list(unsafe_bases()))
def test_an_unsafe_default_base_stops_no_kernel(user_base, workdir, tmp_path, caplog, how):
    # Another user makes /tmp/ns-kernel-UID before us (or a symlink, or a dir anyone may
    # enter): kernels start anyway, in a private dir of ours, and say so once; nothing of
    # ours goes into what they made.
    base, tmpdir = user_base
    unsafe_bases()[how](base, tmpdir)
    before = os.lstat(base)
    with open(tmp_path / "log", "w") as log:
        box = start_both(workdir, log)
    private = private_dirs(tmpdir)
    assert len(private) == 1, private    # found again by the second start
    assert os.path.dirname(box) == os.path.join(tmpdir, private[0])
    info = os.lstat(os.path.join(tmpdir, private[0]))
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    after = os.lstat(base)
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode,
                                                           before.st_uid)
    if how != "symlink":
        assert os.listdir(base) == []
    # One line each: the argv launcher's in its stderr, the provisioner's in the server log.
    lines = [line for line in (tmp_path / "log").read_text().splitlines()
             if line.startswith("ns-kernel: socket base")]
    lines += [r.getMessage() for r in caplog.records if "ns-kernel: socket base" in r.getMessage()]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert lines[0].startswith(f"ns-kernel: socket base {base}: ") and \
        f"kernels use {os.path.join(tmpdir, private[0])} instead" in lines[0], lines[0]


def test_private_dirs_someone_else_made_are_not_ours(user_base, workdir, tmp_path):
    base, tmpdir = user_base
    os.symlink(tmpdir, base)
    # Names a private dir of ours would have, made by someone else first (or planted).
    decoys = [os.path.join(tmpdir, f"ns-kernel-{os.getuid()}-{n}") for n in ("0", "1", "2")]
    os.symlink(tmpdir, decoys[0])
    os.mkdir(decoys[1])
    os.chmod(decoys[1], 0o755)
    with open(decoys[2], "w"):
        pass
    if os.getuid() == 0:
        decoys.append(os.path.join(tmpdir, "ns-kernel-0-3"))
        os.mkdir(decoys[3], 0o700)
        os.chown(decoys[3], OTHER_UID, OTHER_UID)
    with open(tmp_path / "log", "w") as log:
        box = start_both(workdir, log)
    assert os.path.dirname(os.path.dirname(box)) == tmpdir
    assert os.path.dirname(box) not in decoys
    assert os.listdir(decoys[1]) == []
    if os.getuid() == 0:
        assert os.listdir(decoys[3]) == []


def test_cleanup_removes_what_the_kernel_left(workdir, socket_base):
    # A running kernel can no longer write its socket dir (sealed once its sockets are
    # bound: test_trust.py); cleanup must still remove whatever such a dir holds: a dir
    # closed to its owner (000), one it cannot write (0500), symlinks out of it; and
    # nothing outside.
    from ns_kernel import socketdir
    keep = os.path.join(workdir, "keep")
    os.mkdir(keep)
    with open(os.path.join(keep, "file"), "w"):
        pass
    name = write_spec(f"isolated-{os.path.basename(socket_base)}", [f"--socket-dir={socket_base}"])
    k = start_kernel(workdir, kernel_name=name)
    try:
        out, error, _ = k.execute("import os; os.makedirs('/run/ns-kernel/closed')")
        assert error == "OSError", out
    finally:
        stop_kernel(k)
    box = socketdir.create(os.path.join(socket_base, "left"))
    for d, mode in (("closed", 0o000), ("readonly", 0o500)):
        os.makedirs(f"{box}/{d}/sub")
        open(f"{box}/{d}/sub/file", "w").close()
        os.symlink(keep, f"{box}/{d}/out")
        os.chmod(f"{box}/{d}/sub", mode)
        os.chmod(f"{box}/{d}", mode)
    os.symlink(keep, f"{box}/out")
    socketdir.remove(box)
    assert not os.path.lexists(box)
    # socket_base checks that nothing is left in it.
    assert os.listdir(keep) == ["file"]
