"""Interrupt, restart, shutdown, crashes and a SIGKILLed launcher: real kernels, real signals,
and nothing left behind."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import (alive, descendants, interrupt_busy_loop, kernel_host_pid, sandbox_tree,
                      socket_inodes, start_kernel, stop_kernel, wait_for_output, wait_until,
                      write_spec)


def wchan(pid):
    """Where in the kernel the process waits (its main thread): do_wait in a wait4()."""
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


# Every way a kernel starts: warm (the default) on the argv path and the provisioner's,
# a cold prestarted one, and init exec'ing the kernel.
START = {"argv": ([], False), "provisioner": ([], True), "cold": (["--cold"], False),
         "no-prestart": (["--no-prestart"], False)}


@pytest.fixture(params=list(START))
def own_kernel(request, workdir, socket_base):
    options, provisioner = START[request.param]
    name = write_spec(f"isolated-{os.path.basename(socket_base)}",
                      [f"--socket-dir={socket_base}", *options], provisioner=provisioner)
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
                        "notebook's folder or in $HOME (--home persistent); this is a new "
                        "kernel\nFalse\n"), out
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
              "        except FileNotFoundError:\n            pass     # gone meanwhile\n"
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
