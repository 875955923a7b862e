"""Red team 14b: the host-side lifecycle of warm kernels as changed by 697c830..0825c02 (the
provisioner asks the template for a launcher itself and supervises it with warm.Launcher;
the template's launcher watches its requester and leaves on launcher.Abandoned; Launch
opens the server's pidfd first)."""
import os
import subprocess
import sys
import time

import pytest
from jupyter_client.manager import KernelManager

from conftest import (KERNEL_NAME, Kernel, kernel_host_pid, process_state, start_kernel,
                      start_paths, stop_kernel, wait_until)
from ns_kernel import connection

PATHS = start_paths("redteam14b")


def restarts_in_first_moments(workdir, spec, delays, stop_at):
    """Start a kernel of spec, and after each delay restart it as JupyterLab's Restart
    does (restart_kernel(now=False): an interrupt first, then shutdown_request); the
    first output of each restarted kernel, until one has stop_at in it."""
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template listens
    told = []
    try:
        for delay in delays:
            km = KernelManager(kernel_name=spec)
            km.start_kernel(cwd=workdir)
            time.sleep(delay)
            km.restart_kernel(now=False)
            k = Kernel(km, km.client())
            k.kc.start_channels()
            try:
                k.kc.wait_for_ready(timeout=60)
                out = k.execute("print('hello')")[0]
            finally:
                stop_kernel(k)
            if out != "hello\n":
                told.append((delay, out))
            if stop_at in out:
                break
    finally:
        stop_kernel(first)
    return told


@pytest.mark.parametrize("path", ["argv", "provisioner", "cold"])
def test_a_kernel_jupyter_interrupted_at_its_start_was_not_killed_by_sigkill(workdir, path):
    # Attack (or plain bad luck): Restart (or Shutdown, or Interrupt) a kernel right after
    # it was started: jupyter_client's shutdown always interrupts first, SIGINT to the
    # launcher (the provisioner's warm.Launcher sends it over the request's socket;
    # on the argv path the warm client forwards it). A launcher whose sandbox does not stand
    # yet keeps the signal (Launch.pending_signals) and sends it to the monitor as soon as
    # Sandbox.start returns, before the monitor has forked init and installed its forwarder
    # (forked.run made SIGINT SIG_DFL): the monitor dies of SIGINT. A cold launcher reaps
    # its own monitor, sees SIGINT, a signal Jupyter sent (Launch.forwarded): no notice. A
    # warm launcher's monitor is the template's child: Sandbox.wait's _wait_foreign makes
    # up a SIGKILL, which Jupyter did not forward, so explain() keeps "killed by SIGKILL"
    # in the connection file and the restarted kernel's first cell says the kernel the
    # user restarted was "killed by SIGKILL; this is a new kernel". (cold: the control.)
    told = restarts_in_first_moments(workdir, PATHS[path], [i * 0.02 for i in range(8)],
                                     "killed by SIGKILL")
    lies = [(delay, out) for delay, out in told if "killed by SIGKILL" in out]
    assert not lies, f"the restarted kernel was told of a SIGKILL nobody sent: {lies}"


@pytest.mark.parametrize("path", ["argv", "provisioner", "cold"])
def test_a_kernel_jupyter_interrupted_at_its_start_is_not_said_to_have_died(workdir, path):
    # The same early Restart, a little later: the monitor has its forwarder, init passes
    # the SIGINT to the kernel, which runs ipykernel's start (IPKernelApp.initialize, in
    # the preloaded or prestarted interpreter) before ipykernel has set its own SIGINT
    # disposition: KeyboardInterrupt, the kernel exits 1, and the launcher keeps
    # "exited with status 1" although the signal was Jupyter's (Launch.forwarded has it).
    # The restarted kernel's first cell says the kernel died on the user. The warm paths
    # and the cold prestarted one; --no-prestart (init execs the kernel later) not seen.
    told = restarts_in_first_moments(workdir, PATHS[path],
                                     [0.05 + i * 0.03 for i in range(8)], "exited with")
    died = [(delay, out) for delay, out in told if "exited with" in out]
    assert not died, f"the restarted kernel was told of a death Jupyter caused: {died}"


def ipc_links(ip, km):
    """Where each channel's ipc path points, and whether a socket is there (a failing
    test's message)."""
    facts = []
    for name in connection.CHANNELS:
        path = f"{ip}-{getattr(km, name)}"
        try:
            target = os.readlink(path)
            facts.append(f"{name} -> {target} ({'there' if os.path.exists(path) else 'gone'})")
        except OSError as exc:
            facts.append(f"{name}: {exc.strerror}")
    return "; ".join(facts)


@pytest.mark.parametrize("path", ["argv", "cold"])
def test_a_restart_now_keeps_the_ipc_links_of_the_new_kernel(workdir, tmp_path, path):
    # Attack (or plain bad luck): a kernel that takes a moment to die (it holds a few GB,
    # as a data-science kernel does, or many processes) is restarted with now=True by a
    # client that speaks ipc without the provisioner (argv path: the launcher links
    # <ip>-<port> to the kernel's sockets; jupyter_client's transport="ipc"). Jupyter
    # SIGKILLs the warm client and at once starts the new one, which links the same paths
    # (same ip, same ports). The old launcher, abandoned (0825c02), cleans up meanwhile:
    # Launch.cleanup waits for the old kernel's cgroup to empty (limits.remove) and only
    # then unlinks ITS links, which are by now the new kernel's: the client's sockets
    # point at nothing, the new kernel never hears from it. Before 0825c02 the old warm
    # launcher died at once (template._die_with) and left stale links, which the new one
    # replaces, as the cold path's SIGKILLed launcher still does.
    ip = str(tmp_path / "kernel-ipc")
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template listens
    k = start_kernel(workdir, kernel_name=PATHS[path], transport="ipc", ip=ip)
    try:
        link = f"{ip}-{k.km.shell_port}"
        assert os.path.islink(link)
        k.execute("import subprocess, sys\n"
                  "hogs = [subprocess.Popen([sys.executable, '-c', 'x = bytearray(1 << 30); "
                  "import time; time.sleep(600)']) for _ in range(3)]\n"
                  "x = bytearray(2 << 30)", timeout=60)
        old_dir = os.path.dirname(os.readlink(link))    # the old kernel's socket dir
        k.km.restart_kernel(now=True)
        # The old launcher's cleanup has ended: it removes its socket dir last.
        assert wait_until(lambda: not os.path.lexists(old_dir), timeout=30)
        assert wait_until(lambda: os.path.islink(link), timeout=20), \
            "the new kernel's ipc link is gone"
        # What a browser tab reconnecting to the kernel does: new sockets, same paths. The
        # old tab is gone first: its client shares the manager's Session, hence the shell's
        # ZMQ identity, and a ROUTER ignores a second peer of the same identity (whichever
        # of the two reached the new kernel first would have kept it: a flaky test).
        k.kc.stop_channels()
        fresh = Kernel(k.km, k.km.client())
        fresh.kc.start_channels()
        try:
            fresh.kc.wait_for_ready(timeout=30)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}; alive: {k.km.is_alive()}; links: "
                                 f"{ipc_links(ip, k.km)}; the kernel: "
                                 f"{process_state(kernel_host_pid(k))}") from None
        finally:
            fresh.kc.stop_channels()
    finally:
        stop_kernel(k)
        stop_kernel(first)



def test_a_command_run_from_a_shell_a_dead_server_left_runs(workdir):
    # Plain bad luck: `ns-kernel run` from a shell whose environment a Jupyter server gave
    # it long ago: a tmux or nohup started from a notebook's `!` (a plain kernel's
    # subprocesses inherit JPY_PARENT_PID, jupyter_client's launch_kernel sets it), or a
    # terminal of a server that was itself started from a kernel. Since dee92df
    # Launch.run opens that pid's pidfd first and refuses to start once it is gone ("the
    # Jupyter server has exited"), for a command that no Jupyter server started and whose
    # life was never tied to one; before, a pid gone was simply not watched.
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--", "/bin/true"],
                          capture_output=True, text=True, cwd=workdir, timeout=60,
                          env=dict(os.environ, JPY_PARENT_PID=str(gone.pid)))
    assert done.returncode == 0, done.stderr
