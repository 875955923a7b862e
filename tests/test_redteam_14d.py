"""Red team 14d: the warm template's word to the client that started it (52c5ebf: a pipe
whose write end, argv[2], hears LISTENING, LOCKED or FAILED + why; EOF if it died).

What still goes wrong: a template that dies after its imports (a lock file it cannot open,
a socket path it cannot unlink) says nothing; once it holds the path's lock it also leaves
the lock file, and the clients that lost that lock to it (told LOCKED) wait their whole
60 s for a listener that never comes; the template keeps every inheritable fd of the client that started it, for as
long as it lives (IDLE_EXIT), and hands it to every kernel's monitor and init; and a
socket base too long for a Unix socket path is a traceback, not a cold start."""
import errno
import os
import select
import shutil
import subprocess
import sys
import tempfile

import pytest
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager

from conftest import LOOPBACK, start_kernel, start_paths, stop_kernel, stop_templates, \
    wait_until, write_spec
from ns_kernel import warm

PATHS = start_paths("rt14d")


def read(log):
    log.seek(0)
    return log.read()


def warm_lines(text):
    return [line for line in text.splitlines() if line.startswith("ns-kernel: warm start:")]


def start_all(n, workdir, tmp_path, path):
    """n kernels of the start path, started at once; their launchers' logs."""
    kms, logs = [], []
    for i in range(n):
        logs.append(open(tmp_path / f"launcher-{i}.log", "w+"))
        km = KernelManager(kernel_name=PATHS[path])
        km.start_kernel(cwd=workdir, stderr=logs[-1])
        kms.append(km)
    return kms, logs


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_clients_that_lose_the_lock_to_a_dying_template_start_at_once(user_base, workdir,
                                                                      tmp_path, path):
    # Three first kernels at once, each client starting a template: one wins the path's
    # lock and dies at its socket path (a directory: nothing can unlink or bind it). The
    # others were told LOCKED ("another one is about to listen") and wait 60 s for nobody
    # (60.7 s measured), past Jupyter's own start timeout.
    base, _ = user_base
    os.makedirs(base, mode=0o700)
    os.mkdir(warm.socket_path())
    kms, logs = start_all(3, workdir, tmp_path, path)
    try:
        # Not a time limit: a hang's detector, half the 60 s one client used to wait.
        for i, log in enumerate(logs):
            assert wait_until(lambda: warm_lines(read(log)), timeout=30), \
                f"launcher {i} said nothing in 30 s: {[warm_lines(read(log)) for log in logs]}"
        lines = [warm_lines(read(log))[0] for log in logs]
        assert not [line for line in lines if "never listened" in line], lines
    finally:
        for km in kms:
            km.shutdown_kernel(now=True)
        for log in logs:
            log.close()


@pytest.mark.parametrize("path", ["argv", "provisioner"])
@pytest.mark.parametrize("which", ["socket", "lock"])
def test_a_template_that_dies_after_its_imports_says_why_and_leaves_no_lock(
        user_base, workdir, tmp_path, path, which):
    # The template's imports went well; then its lock file (which="lock") or its socket
    # path ("socket") is a directory. The client hears EOF and logs "it died as it
    # started": the template knew why (EISDIR) and did not say; after the socket's failure
    # its lock file stays behind.
    base, _ = user_base
    os.makedirs(base, mode=0o700)
    sock = warm.socket_path()
    os.mkdir(sock if which == "socket" else sock + ".lock")
    kms, logs = start_all(1, workdir, tmp_path, path)
    try:
        assert wait_until(lambda: warm_lines(read(logs[0])), timeout=30), read(logs[0])
    finally:
        kms[0].shutdown_kernel(now=True)
        said = read(logs[0])
        logs[0].close()
    line = warm_lines(said)[0]
    assert os.strerror(errno.EISDIR) in line, line
    if which == "socket":
        assert wait_until(lambda: not os.path.exists(sock + ".lock"), timeout=5), \
            os.listdir(base)


def test_the_first_clients_other_fds_do_not_outlive_it(user_base, workdir, tmp_path):
    # A client started with an fd of its caller's beyond stdio (a shell's 3>, make's
    # jobserver pipe): the template it spawns inherits it, keeps it for as long as it
    # lives (IDLE_EXIT, 10 min), and every kernel's launcher, monitor and init forked
    # from it holds it too (a host fd in the sandbox's PID 1). The caller waiting for the
    # pipe's EOF waits for the template. (The provisioner's clients, Popen'd with
    # close_fds, have only their stdio: argv path only.)
    conn = str(tmp_path / "kernel-14d.json")
    write_connection_file(conn, ip=LOOPBACK)
    theirs, given = os.pipe()
    log = open(tmp_path / "launcher.log", "w+")
    client = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "-f", conn],
                              cwd=workdir, pass_fds=(given,), stderr=log)
    os.close(given)
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient()
    kc.load_connection_file(conn)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert warm.template_pid() is not None, read(log)   # a warm start, not a cold one
    finally:
        kc.shutdown()
        kc.stop_channels()
        try:
            client.wait(30)
        finally:
            client.kill()
            client.wait()
            log.close()
    hears = select.poll()
    hears.register(theirs, select.POLLIN)
    # Once the kernel's processes have gone, nobody but the template could hold it.
    eof = wait_until(lambda: bool(hears.poll(0)) and os.read(theirs, 1) == b"", timeout=10)
    os.close(theirs)
    assert eof, f"the template {warm.template_pid()} still holds the first client's fd"


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_socket_base_too_long_for_the_template_starts_the_kernel_cold(workdir, monkeypatch,
                                                                        path):
    # $XDG_RUNTIME_DIR so long that <it>/ns-kernel/warm-KEY.sock passes the 107 bytes of a
    # Unix socket path; the kernels' socket dirs are elsewhere (--socket-dir). warm._connect
    # raised OSError "AF_UNIX path too long", which nobody caught: in the client a
    # traceback, exit 1, no kernel; in the provisioner (the Jupyter server) a failed start.
    runtime = tempfile.mkdtemp(prefix="nsk-run-")
    long_dir = os.path.join(runtime, "r" * (100 - len(runtime)))
    os.mkdir(long_dir)
    sockets = tempfile.mkdtemp(prefix="nsk-sd-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", long_dir)
    name = write_spec(f"rt14d-short-socket-dir-{path}", [f"--socket-dir={sockets}"],
                      provisioner=path == "provisioner")
    log = tempfile.TemporaryFile("w+")
    try:
        k = start_kernel(workdir, kernel_name=name, stderr=log)
        try:
            assert k.value("1 + 1") == 2
        finally:
            stop_kernel(k)
        assert "Traceback" not in read(log), read(log)
        assert len(warm_lines(read(log))) == 1, read(log)
    finally:
        log.close()
        stop_templates()
        for path in (runtime, sockets):
            shutil.rmtree(path, ignore_errors=True)
