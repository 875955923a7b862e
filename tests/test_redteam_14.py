"""Red team 14: the provisioner's warm start without a client interpreter (commit 697c830).
The provisioner, in the Jupyter server, asks the user's warm template for the launcher
itself; the launcher it forks dies with its requester, now the server."""
import gc
import os
import resource
import socket
import subprocess
import sys

import pytest

from conftest import KERNEL_NAME, kernel_cgroups, start_kernel, stop_kernel, wait_until, write_spec

PROVISIONED = write_spec("redteam14-provisioner", provisioner=True)

# A Jupyter server of its own that dies (SIGKILL: the OOM killer, a crash, `kill -9`) after
# it started a kernel: while the kernel starts (the moment the launcher has made the
# kernel's socket dir), or once it runs (it answered).
SERVER = """
import os, signal, sys, uuid
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir
kid = str(uuid.uuid4())
os.makedirs(jupyter_runtime_dir(), exist_ok=True)
km = KernelManager(kernel_name=sys.argv[1],
                   connection_file=os.path.join(jupyter_runtime_dir(), f"kernel-{kid}.json"))
km.start_kernel(cwd=sys.argv[2])
box = km.provisioner.kernel_socket_dir
print(type(km.provisioner.process).__name__, kid, box, flush=True)
if sys.argv[3] == "starting":
    while not os.path.lexists(box):
        pass
else:
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("moment", ["starting", "running"])
def test_a_server_killed_with_a_warm_kernel_leaves_nothing(workdir, moment):
    # Attack: make the Jupyter server die (any local way: exhaust memory so the OOM killer
    # picks it, crash it, or just a user's kill -9) right after it asked for a kernel.
    # On the provisioner's warm path the launcher is forked by the template and dies with
    # its requester, now the server itself (template._die_with: os._exit(137) at once).
    # While the launcher is still building the start (cgroup made, socket dir made, plan
    # not yet handed to the monitor), nobody removes what it made: the kernel's socket dir
    # (with connection.json, the kernel's HMAC key, owned by the sandbox's uid) and its
    # cgroup stay behind, once per such death. Once the kernel runs, two threads of the
    # launcher see the server go at once: _supervise (JPY_PARENT_PID) SIGKILLs the monitor,
    # whose own cleanup (sandbox._supervise) then never runs, and _die_with's thread exits
    # the launcher before Launch.cleanup does: the same two things stay. Before 697c830
    # the launcher's requester was a client in a session of its own that outlived the
    # server: only _supervise saw the server go, and Launch.cleanup removed both, as on
    # the cold path still.
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template runs
    leaks = []
    try:
        for _ in range(5):
            server = subprocess.run([sys.executable, "-c", SERVER, PROVISIONED, workdir, moment],
                                    stdout=subprocess.PIPE, text=True, timeout=120)
            kind, kid, box = server.stdout.split()
            assert kind == "Launcher"       # the new path, not the client
            wait_until(lambda: not os.path.lexists(box) and not kernel_cgroups(kid),
                       timeout=10)
            if os.path.lexists(box) or kernel_cgroups(kid):
                leaks.append((box, os.listdir(box) if os.path.isdir(box) else None,
                              kernel_cgroups(kid)))
                # Ours to clean, so the run leaves nothing whatever the outcome.
                subprocess.run(["rm", "-rf", box])
                for group in kernel_cgroups(kid):
                    os.rmdir(group)
    finally:
        stop_kernel(first)
    assert not leaks, f"left behind by a warm start whose server died: {leaks}"


def test_a_server_holding_many_fds_still_controls_its_warm_kernel(workdir):
    # Attack: another local user opens ~1000 idle TCP connections to the Jupyter server's
    # port (127.0.0.1:8888 takes anyone's; tornado keeps an idle one for an hour), or the
    # server is merely busy (kernels, terminals, websockets): jupyter_server raises its
    # open-files limit to 4096 for this, so new fds are numbered above 1023. A kernel
    # started then gets a warm.Launcher whose socket is such an fd, and Launcher.poll and
    # wait use select.select, which refuses fds >= FD_SETSIZE (ValueError): the server can
    # no longer tell whether the kernel lives (is_alive), restart or shut it down, ever
    # (the fd keeps its number when the connections close); the sandbox runs on until
    # the server exits. A Popen'd client (before 697c830, and the argv path) is polled
    # with waitpid, which has no such limit. Here this process is the server.
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template runs
    # Once first, as a server has: what a first start imports and lets go is done with.
    stop_kernel(start_kernel(workdir, kernel_name=PROVISIONED))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # What jupyter_server does at start (ServerApp.min_open_files_limit).
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    k = None
    try:
        gc.collect()    # no file object of the test's own closes meanwhile
        # Connections take the lowest free fds: until none is left below 1024.
        while not held or held[-1].fileno() < 1024:
            client = socket.create_connection(listener.getsockname())
            held += [client, listener.accept()[0]]
        k = start_kernel(workdir, kernel_name=PROVISIONED)
        launcher = k.km.provisioner.process
        assert type(launcher).__name__ == "Launcher"     # the new path, not the client
        assert k.km.is_alive()
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=30)
        stop_kernel(k)
        assert not k.km.has_kernel
        k = None
    finally:
        for sock in (*held, listener):
            sock.close()
        if k is not None:       # what the server could not do: end the kernel
            k.kc.stop_channels()
            launcher = k.km.provisioner.process
            launcher.kill()
            wait_until(lambda: not os.path.exists(f"/proc/{launcher.pid}"), timeout=10)
            wait_until(lambda: not os.path.lexists(k.km.provisioner.kernel_socket_dir), timeout=10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stop_kernel(first)
