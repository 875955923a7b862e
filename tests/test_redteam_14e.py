"""Red team 14e: 44c6490, a warm launcher that hands its running kernel to the sandbox's
monitor and exits (launcher.Launch.hand_off / taken_over, template._take_over): from then
on the monitor alone relays the output, watches the server and the requester, writes the
death notice and removes what the launcher made."""
import os
import pathlib
import signal
import subprocess
import time

import pytest

from conftest import (LIMITS_BACKEND, alive, kernel_in_pid_namespace, parent_pid, start_kernel,
                      stop_kernel, wait_until, write_spec)
from ns_kernel import cgroup


def kernel_cgroups_of(pid):
    """The host dirs of the ns-kernel cgroups pid is in, in every hierarchy."""
    mounts = cgroup.hierarchies()
    found = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            if "/ns-kernel-" in path:
                name = controllers.split(",")[0] or "cgroup2"
                found.append(mounts[name][0] + path)
    return sorted(set(found))


def handed_off(monitor, log):
    """The monitor has taken over from a warm launcher: its stderr is the server's log
    (taken_over), no longer the kernel's pipe."""
    try:
        return os.readlink(f"/proc/{monitor}/fd/2") == str(log)
    except OSError:
        return False


@pytest.mark.parametrize("path, options", [("argv", []), ("argv", ["--cold"]),
                                           ("provisioner", []), ("provisioner", ["--cold"])],
                         ids=["argv-warm", "argv-cold", "provisioner-warm", "provisioner-cold"])
def test_a_killed_monitor_leaves_nothing_behind(workdir, socket_base, tmp_path, path, options):
    # Attack: SIGKILL the sandbox's monitor of a running kernel (the user may: it is their
    # uid, as is the kernel's for an ordinary user; root may; so may the OOM killer, now
    # that the monitor holds the launcher's state and is no longer in the kernel's cgroup).
    # Before 44c6490 the launcher (cold: still) saw its monitor go, and removed the ipc
    # links, the socket dir and the kernel's cgroup at once. Once a warm launcher has
    # handed off, the monitor was the only one who knew them: on the argv path (an ipc
    # connection) all three stay for good; on the provisioner's, the cgroup stays, and the
    # socket dir until the provisioner's cleanup.
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}", *options], provisioner=path != "argv")
    log = tmp_path / "server.log"
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path == "argv" else {}
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=name, stderr=stderr, **ipc)
    links = [str(tmp_path / f"kernel-ipc-{k.km.shell_port}")] if ipc else []
    groups = []
    try:
        assert all(map(os.path.islink, links)) and len(os.listdir(socket_base)) == 1
        ns = k.value("__import__('os').readlink('/proc/self/ns/pid')")
        monitor = parent_pid(parent_pid(kernel_in_pid_namespace(ns)))
        if not options:
            assert wait_until(lambda: handed_off(monitor, log))
        groups = kernel_cgroups_of(kernel_in_pid_namespace(ns))
        assert bool(groups) == (LIMITS_BACKEND != "rlimit")
        os.kill(monitor, signal.SIGKILL)
        assert wait_until(lambda: not k.km.is_alive(), timeout=20)
        assert wait_until(lambda: not alive([monitor]))
        wait_until(lambda: not any(map(os.path.lexists, links)) and not os.listdir(socket_base)
                   and not any(map(os.path.isdir, groups)), timeout=3)
        left = {"links": [p for p in links if os.path.lexists(p)],
                "socket dirs": os.listdir(socket_base),
                "cgroups": [g for g in groups if os.path.isdir(g)]}
    finally:
        stop_kernel(k)
        # Ours to clean, whatever the outcome.
        for link in links:
            if os.path.lexists(link):
                os.unlink(link)
        for box in os.listdir(socket_base):
            subprocess.run(["rm", "-rf", os.path.join(socket_base, box)])
        for group in groups:
            if os.path.isdir(group):
                os.rmdir(group)
    assert not any(left.values()), f"left behind by a killed monitor: {left}"



@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_kernel_dead_before_a_late_hand_off_keeps_its_status(workdir, socket_base, tmp_path,
                                                               path):
    # Attack (or a busy host): the launcher is late to hand the kernel over, and the kernel
    # dies meanwhile. Here the server's log is not read for a moment (a paused terminal,
    # a slow journal), so the launcher's "limits" line blocks it just before the hand-off,
    # while the kernel, sockets bound, exits in its first line (exec_lines). The monitor
    # sees init go and exits; the launcher then hands the kernel to nobody.
    import fcntl
    import threading
    from jupyter_client.manager import KernelManager
    from conftest import in_pid_namespace
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}"], provisioner=path == "provisioner")
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path == "argv" else {}
    km = KernelManager(kernel_name=name, **ipc)
    read, write = os.pipe()
    os.write(write, b"\n" * fcntl.fcntl(write, 1032))     # F_GETPIPE_SZ: full
    marker = os.path.join(workdir, "died")
    try:
        km.start_kernel(cwd=workdir, stderr=write, extra_arguments=[
            "--IPKernelApp.exec_lines=import os; open('died', 'w').write("
            "os.readlink('/proc/self/ns/pid')); os._exit(3)"])
    finally:
        os.close(write)
    log = []
    def drain():
        with open(read, "rb") as f:
            log.append(f.read())
    reader = threading.Thread(target=drain)
    try:
        assert wait_until(lambda: os.path.exists(marker) and pathlib.Path(marker).read_text(),
                          timeout=60)
        ns = pathlib.Path(marker).read_text()
        assert wait_until(lambda: not in_pid_namespace(ns))
        # The point: the log stays unread a moment longer, while init and the monitor
        # leave (their pids are not known here: the kernel died in its first line).
        time.sleep(1)
        reader.start()
        assert wait_until(lambda: not km.is_alive(), timeout=20)
        code = km.provisioner.process.wait(timeout=5)
        wait_until(lambda: not os.listdir(socket_base), timeout=5)
        left = os.listdir(socket_base)
    finally:
        km.shutdown_kernel(now=True)
        if reader.ident is None:     # not started: the launcher may wait on its log
            reader.start()
        reader.join(timeout=10)
    said = [line for line in b"".join(log).decode().splitlines() if line.startswith("ns-kernel:")]
    assert (code, left) == (3, []), said
    assert said[-1].endswith("exited with status 3"), said


@pytest.mark.skipif(os.getuid() != 0, reason="root's monitor has no capability on the host: "
                    "an ordinary user's has the user's own access, as its launcher had")
@pytest.mark.parametrize("path", ["argv", "provisioner", "cold"])
def test_root_kernel_death_notice_in_a_runtime_dir_root_does_not_own(workdir, socket_base,
                                                                     tmp_path, path):
    # Root runs the Jupyter server with its runtime dir (the connection file's) in a dir of
    # another user's, 0700 (`sudo jupyter lab` keeping the user's HOME; a shared runtime
    # dir). The launcher, root on the host, reads and writes there by CAP_DAC_OVERRIDE.
    # The monitor it hands the kernel to is root in a user namespace of its own, with no
    # capability on the host: it cannot reach the connection file to keep why the kernel
    # died, and the restarted kernel is never told.
    import json
    from jupyter_client.manager import KernelManager
    from ns_kernel import notice
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 12345, 12345)     # nobody's: not root's, not the sandbox's
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}", *(["--cold"] if path == "cold" else [])],
                      provisioner=path == "provisioner")
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path != "provisioner" else {}
    km = KernelManager(kernel_name=name, connection_file=str(runtime / "kernel-1.json"), **ipc)
    km.start_kernel(cwd=workdir)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute("import os; os._exit(3)")
        assert wait_until(lambda: not km.is_alive(), timeout=20)
        assert km.provisioner.process.wait(timeout=5) == 3
        with open(km.connection_file) as f:
            told = json.load(f).get(notice.NOTICE_KEY, "")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert told.endswith("exited with status 3"), told
