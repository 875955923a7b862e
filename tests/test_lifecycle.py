"""Interrupt, restart, shutdown, crashes and a SIGKILLed launcher: real kernels, real signals,
and nothing left behind."""
import os
import signal
import subprocess
import sys
import time

import pytest
from jupyter_client.manager import KernelManager

from conftest import ALL_PATHS, KERNEL_NAME, Kernel, alive, descendants, interrupt_busy_loop, \
    kernel_host_pid, process_state, sandbox_tree, socket_inodes, start_kernel, \
    start_path_spec, start_paths, stop_kernel, wait_for_output, wait_until, write_spec
from ns_kernel import connection

def wchan(pid):
    """Where in the kernel the process waits (its main thread): do_wait in a wait4()."""
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


# Every way a kernel starts: warm (the default) on the argv path and the provisioner's,
# a cold prestarted one, and init exec'ing the kernel.
@pytest.fixture(params=ALL_PATHS)
def own_kernel(request, workdir, socket_base):
    name = start_path_spec(f"isolated-{os.path.basename(socket_base)}", request.param,
                           [f"--socket-dir={socket_base}"])
    k = start_kernel(workdir, kernel_name=name)
    yield k
    stop_kernel(k)


def test_interrupt_busy_loop_keeps_kernel(own_kernel):
    interrupt_busy_loop(own_kernel)
    assert own_kernel.value("6 * 7") == 42


def test_interrupt_arrives_once_and_reaches_subprocesses(own_kernel):
    k = own_kernel
    kernel = kernel_host_pid(k)     # while it is idle: it may be asked where it is
    # The cell's own handler counts deliveries (ipykernel resets handlers between cells).
    msg_id = k.kc.execute("import signal, subprocess, time\nhits = []\n"
                          "signal.signal(signal.SIGINT, lambda *a: hits.append(1))\n"
                          "print('armed', flush=True)\ntime.sleep(2)")
    wait_for_output(k, "armed")
    k.km.interrupt_kernel()
    k.reply(msg_id)
    assert k.value("len(hits)") == 1
    # A child in the kernel's process group is interrupted too, as under a plain kernel.
    msg_id = k.kc.execute("p = subprocess.Popen(['sleep', '60'])\n"
                          "print('spawned', flush=True)\np.wait()")
    wait_for_output(k, "spawned")
    # Past Popen's return: into p.wait(), waiting on its child (its main thread's wchan).
    assert wait_until(lambda: wchan(kernel) == "do_wait"), wchan(kernel)
    k.km.interrupt_kernel()
    reply = k.reply(msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # Gone, killed by the SIGINT. (Not p.returncode: ipykernel sometimes reaps the child
    # itself, leaving subprocess a 0, under a plain kernel just the same.)
    k.execute("import os\nfor _ in range(100):\n    p.poll()\n"
              "    if not os.path.exists(f'/proc/{p.pid}'):\n        break\n    time.sleep(0.05)")
    assert k.value("os.path.exists(f'/proc/{p.pid}')") is False
    assert k.value("p.returncode") in (-signal.SIGINT, 0)


def test_restart_gives_fresh_sandbox(own_kernel):
    k = own_kernel
    k.execute("secret = 1; open('/tmp/marker', 'w').close()")
    old = sandbox_tree(k)
    assert len(old) >= 3        # monitor, init, kernel
    k.km.restart_kernel(now=False)
    k.kc.wait_for_ready(timeout=60)
    # The new kernel's first output says what the old one lost (leftovers.py).
    out, error, _ = k.execute("print('secret' in globals())")
    assert error is None
    assert out.endswith(" left /tmp/marker, gone with its sandbox: keep files in the "
                        "notebook's folder or in $HOME; this is a new kernel\nFalse\n"), out
    assert k.value("__import__('os').path.exists('/tmp/marker')") is False
    assert k.value("__import__('os').getpid()") == 2
    assert wait_until(lambda: not alive(old)), f"old sandbox survived: {alive(old)}"


@pytest.mark.parametrize("options", [[], ["--cold"]], ids=["warm", "cold"])
def test_shutdown_leaves_nothing(workdir, socket_base, options):
    name = write_spec(f"isolated-{os.path.basename(socket_base)}",
                      [f"--socket-dir={socket_base}", *options])
    k = start_kernel(workdir, kernel_name=name)
    launcher = k.km.provisioner.process.pid
    tree = [launcher, *sandbox_tree(k)]
    assert len(tree) >= 4   # launcher (a warm one's client), monitor, init, kernel
    assert len(os.listdir(socket_base)) == 1
    stop_kernel(k)
    assert wait_until(lambda: not alive(tree)), f"still running: {alive(tree)}"
    assert os.listdir(socket_base) == []


@pytest.mark.parametrize("path", ALL_PATHS)
def test_a_kernel_with_a_child_ends_by_itself_at_shutdown(workdir, socket_base, tmp_path, path):
    # Jupyter's interrupt before a shutdown ends the kernel's child too; ipykernel's shutdown
    # then signals its children until none is left, and took that one, ended but not waited
    # for, for one left: jupyter_client SIGTERMed the kernel after 2.5 s (a plain kernel's
    # too). Now the kernel ends by itself (reaper.py): status 0, nothing in the server log.
    name = start_path_spec(f"isolated-{os.path.basename(socket_base)}", path,
                           [f"--socket-dir={socket_base}"])
    with open(tmp_path / "log", "w+") as log:
        k = start_kernel(workdir, kernel_name=name, stderr=log)
        launcher = k.km.provisioner.process
        k.execute("import subprocess; child = subprocess.Popen(['sleep', '300'])")
        stop_kernel(k)
        assert launcher.wait(timeout=20) == 0
        log.seek(0)
        assert [line for line in log if " limits: " not in line] == []


@pytest.mark.parametrize("options", [[], ["--cold"]], ids=["warm", "cold"])
def test_sigkill_of_launcher_takes_the_whole_sandbox(workdir, socket_base, options):
    # Warm: Jupyter's SIGKILL reaches the client; the launcher forked for it goes too.
    name = write_spec(f"isolated-{os.path.basename(socket_base)}",
                      [f"--socket-dir={socket_base}", *options])
    k = start_kernel(workdir, kernel_name=name)
    try:
        k.execute("import subprocess; subprocess.Popen(['sleep', '300'])")
        launcher = k.km.provisioner.process.pid
        tree = sandbox_tree(k)
        assert len(tree) >= 4   # monitor, init, kernel, sleep
        os.kill(launcher, signal.SIGKILL)
        assert wait_until(lambda: not alive(tree), timeout=3), f"survivors: {alive(tree)}"
        assert wait_until(lambda: os.listdir(socket_base) == [], timeout=3)
    finally:
        stop_kernel(k)


@pytest.mark.parametrize("code, status", [("import os; os._exit(3)", 3),
                                          ("import os, signal; os.kill(os.getpid(), "
                                           "signal.SIGSEGV)", -signal.SIGSEGV)])
def test_kernel_death_is_the_launchers_status(own_kernel, code, status):
    k = own_kernel
    proc = k.km.provisioner.process
    k.kc.execute(code)
    assert proc.wait(timeout=20) == status


def test_init_reaps_orphans(own_kernel):
    k = own_kernel
    # sh exits at once; its background sleep is orphaned to init, which must reap it.
    k.execute("import subprocess; subprocess.run(['sh', '-c', 'sleep 0.3 & exit 0'])")
    k.execute("import os\ndef states():\n    found = []\n"
              "    for p in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
              "            with open(f'/proc/{p}/stat') as f:\n"
              "                found.append(f.read().rsplit(')', 1)[1].split()[0])\n"
              "        except (FileNotFoundError, ProcessLookupError):\n            pass     # gone meanwhile\n"
              "    return found")
    # The sleep runs on a moment, then exits: an init that does not reap leaves a zombie.
    assert wait_until(lambda: len(k.value("states()")) == 2), k.value("states()")
    assert "Z" not in k.value("states()")


def test_launcher_exits_when_jupyter_server_dies(workdir, socket_base, tmp_path):
    """ipykernel polls its parent; inside, the launcher does it for the kernel."""
    from jupyter_client.connect import write_connection_file
    conn = str(tmp_path / "kernel-0123abcd.json")
    write_connection_file(conn)
    server = subprocess.Popen(["sleep", "300"])
    env = dict(os.environ, JPY_PARENT_PID=str(server.pid))
    launcher = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "--cold",
                                 f"--socket-dir={socket_base}", "-f", conn], cwd=workdir,
                                env=env, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: len(descendants(launcher.pid)) >= 3, timeout=20)
        tree = descendants(launcher.pid)
        server.kill()
        server.wait()
        launcher.wait(timeout=10)
        assert wait_until(lambda: not alive(tree), timeout=3)
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stderr.close()
        server.kill()
        server.wait()


def test_ipc_client_talks_to_kernel_sockets_directly(workdir, socket_base, tmp_path):
    name = write_spec(f"isolated-{os.path.basename(socket_base)}", [f"--socket-dir={socket_base}"])
    k = start_kernel(workdir, kernel_name=name, transport="ipc",
                     ip=str(tmp_path / "kernel-ipc"))
    try:
        links = [str(tmp_path / f"kernel-ipc-{k.km.shell_port}")]
        assert os.path.islink(links[0])
        assert k.value("1 + 1") == 2
        # No TCP port anywhere in the launcher's tree.
        launcher = k.km.provisioner.process.pid
        with open("/proc/net/tcp") as f:
            tcp = f.read()
        assert not [i for i in socket_inodes([launcher, *descendants(launcher)]) if i in tcp]
    finally:
        stop_kernel(k)
    assert not os.path.lexists(links[0])


# -- signals and restarts in a warm kernel's first moments ---------------------------------
# An interrupt at a kernel's start neither kills it nor is said to have; a restart keeps
# the new kernel's ipc links; a command runs whatever server its shell once had.

PATHS = start_paths("lifecycle-start")


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
    # yet keeps the signal (Supervisor.pending) and sends it to the monitor as soon as
    # Sandbox.start returns, before the monitor has forked init and installed its forwarder
    # (forked.run made SIGINT SIG_DFL): the monitor dies of SIGINT. A cold launcher reaps
    # its own monitor, sees SIGINT, a signal Jupyter sent (Life.forwarded): no notice. A
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
    # "exited with status 1" although the signal was Jupyter's (Life.forwarded has it).
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
    # (same ip, same ports). The old launcher, abandoned, cleans up meanwhile: if it
    # waited for the old kernel's cgroup to empty before it unlinked ITS links, those
    # would by now be the new kernel's: the client's sockets would point at nothing, and
    # the new kernel never hear from it. It unlinks first, and only links still its own.
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
    # terminal of a server that was itself started from a kernel. launcher.run opens that
    # pid's pidfd first, and a kernel refuses to start once it is gone ("the Jupyter
    # server has exited"); a command, which no Jupyter server started and whose life was
    # never tied to one, runs.
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--", "/bin/true"],
                          capture_output=True, text=True, cwd=workdir, timeout=60,
                          env=dict(os.environ, JPY_PARENT_PID=str(gone.pid)))
    assert done.returncode == 0, done.stderr


def test_a_command_stopped_by_its_own_signal_says_no_word(workdir):
    # `ns-kernel run -- CMD` from a terminal, stopped as one stops a command (Ctrl-C, a
    # kill): the launcher forwards the signal, the command dies of it. That is no death to
    # explain (explain() says nothing: Jupyter's own stops are quiet too), and stderr got
    # the word "None" instead.
    proc = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                             sys.executable, "-c", "print('up', flush=True); "
                             "__import__('time').sleep(600)"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGTERM, err
    assert "None" not in err.splitlines(), err
