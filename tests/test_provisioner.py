"""The kernel provisioner through jupyter_client's AsyncKernelManager, as jupyter_server
drives it: direct ipc sockets in the kernel's socket dir, the exact lifecycle (poll, wait,
send_signal, kill, terminate, cleanup, restart), settings from the config stanza, and
refusals of a bad stanza. Real kernels in real namespaces."""
import asyncio
import json
import os
import signal
import stat

import pytest
from jupyter_client.manager import AsyncKernelManager

from conftest import socket_inodes, write_spec
from ns_kernel.connection import CHANNELS
from conftest import alive, descendants, kernel_in_pid_namespace, parent_pid, wait_until


def spec(socket_base, options=(), config=None):
    return write_spec(f"prov-{os.path.basename(socket_base)}", [f"--socket-dir={socket_base}",
                                                                *options],
                      provisioner=True, config=config)


async def start(name, cwd):
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


async def run(kc, code, timeout=30):
    """Execute code; (printed text, error name or None)."""
    out = []
    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: out.append(
        msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None)
    return "".join(out), reply["content"].get("ename")


async def value(kc, expr):
    """expr's value, from the execute reply's user_expressions (the shell channel), not
    from a print on iopub: ipykernel's own FIXME in execute_request says a flush at rare
    times does not reach the client, and once here, under CI's load, right after an
    interrupt, the print's text never came though its cell ran without error."""
    import ast
    reply = await kc.execute_interactive("", user_expressions={"v": expr}, timeout=30)
    result = reply["content"]["user_expressions"]["v"]
    assert result["status"] == "ok", result
    return ast.literal_eval(result["data"]["text/plain"])


def tcp_socket_inodes():
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            inodes.update(line.split()[9] for line in list(f)[1:])
    return inodes


def test_client_talks_to_the_kernels_own_sockets(workdir, socket_base):
    async def main():
        km, kc = await start(spec(socket_base), workdir)
        try:
            box = km.provisioner.kernel_socket_dir
            info = km.get_connection_info()
            assert info["transport"] == "ipc" and info["ip"] == f"{box}/k"
            assert os.path.dirname(box) == socket_base
            # Private: its owner's alone; root's, shared with its kernels' group (nobody's),
            # so that root needs no CAP_DAC_OVERRIDE in it (socketdir.create).
            made = os.stat(box)
            assert (made.st_uid, stat.S_IMODE(made.st_mode)) == (
                os.getuid(), 0o770 if os.getuid() == 0 else 0o700)
            assert made.st_gid == (65534 if os.getuid() == 0 else os.getgid())
            for name in CHANNELS:   # real sockets, not links to somewhere else
                assert stat.S_ISSOCK(os.lstat(f"{box}/k-{info[name]}").st_mode)
            assert await value(kc, "__import__('os').getpid()") == 2
            # No TCP socket anywhere on the kernel's host side: the monitor and all below
            # it, and a cold start's launcher above it (a warm one, a template's fork,
            # handed the kernel to the monitor and left): no bridge, no port.
            ns = await value(kc, "__import__('os').readlink('/proc/self/ns/pid')")
            monitor = parent_pid(parent_pid(kernel_in_pid_namespace(ns)))
            tree = [monitor, *descendants(monitor)]
            if parent_pid(monitor) == km.provisioner.pid:
                tree.append(km.provisioner.pid)
            assert len(tree) >= 3 and not socket_inodes(tree) & tcp_socket_inodes()
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
        assert not os.path.lexists(box)
    asyncio.run(main())


def test_lifecycle_signal_restart_terminate_kill_cleanup(workdir, socket_base):
    async def main():
        km, kc = await start(spec(socket_base), workdir)
        prov = km.provisioner
        box = prov.kernel_socket_dir
        try:
            assert await prov.poll() is None
            # send_signal: an interrupt reaches a busy cell; the kernel lives on.
            msg_id = kc.execute("print('looping', flush=True)\nwhile True: pass")
            while True:   # interrupt once it runs (a loaded machine takes a while)
                msg = await kc.get_iopub_msg(timeout=30)
                if msg["msg_type"] == "stream" and "looping" in msg["content"]["text"]:
                    break
            await km.interrupt_kernel()
            reply = await kc._async_get_shell_msg(timeout=10)
            while reply["parent_header"]["msg_id"] != msg_id:   # a late kernel_info_reply
                assert reply["msg_type"] == "kernel_info_reply", reply
                reply = await kc._async_get_shell_msg(timeout=10)
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert await value(kc, "6 * 7") == 42

            # restart, gently and by kill: same paths for the client, a fresh sandbox.
            await run(kc, "open('/tmp/marker', 'w').close()")
            for now in (False, True):
                old = descendants(prov.pid)
                await km.restart_kernel(now=now)
                await kc.wait_for_ready(timeout=60)
                assert prov.kernel_socket_dir == box
                assert km.get_connection_info()["ip"] == f"{box}/k"
                text, error = await run(kc, "print(__import__('os').path.exists('/tmp/marker'))")
                assert error is None and text.endswith("False\n"), text
                # A kernel that ended by itself names what it lost; a killed one cannot.
                assert (" left /tmp/marker, gone with its sandbox" in text) == (not now), text
                assert await value(kc, "__import__('os').getpid()") == 2
                assert wait_until(lambda: not alive(old)), f"old sandbox survived: {alive(old)}"

            # terminate: SIGTERM goes through the launcher to the kernel, which ends; wait()
            # gives the launcher's status, poll() agrees, cleanup() leaves no socket dir.
            tree = [prov.pid, *descendants(prov.pid)]
            await prov.terminate()
            assert await asyncio.wait_for(prov.wait(), 20) in (0, -signal.SIGTERM)
            assert await prov.poll() is not None or not prov.has_process
            assert wait_until(lambda: not alive(tree)), f"still running: {alive(tree)}"
            await prov.cleanup(restart=True)
            assert not os.path.lexists(box)

            # kill: SIGKILL of the launcher; the sandbox goes with it and cleanup() waits for
            # its socket dir to go before a restart may make it again.
            await km.start_kernel(cwd=workdir)
            await kc.wait_for_ready(timeout=60)
            assert prov.kernel_socket_dir == box
            tree = [prov.pid, *descendants(prov.pid)]
            await prov.kill()
            assert await asyncio.wait_for(prov.wait(), 20) == -signal.SIGKILL
            await prov.cleanup(restart=False)
            assert not os.path.lexists(box)
            assert wait_until(lambda: not alive(tree), timeout=3), f"survivors: {alive(tree)}"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    asyncio.run(main())


def test_config_stanza_reaches_the_launcher(workdir, socket_base):
    async def main():
        name = spec(socket_base, ["--network=none"], {"tmp_size": "8M", "hostname_prefix": "lab"})
        km, kc = await start(name, workdir)
        try:
            assert (await value(kc, "__import__('socket').gethostname()")).startswith("lab-")
            st = await value(kc, "tuple(__import__('os').statvfs('/tmp'))")
            assert st[0] * st[2] == 8 << 20   # f_bsize * f_blocks
            # argv's options still count: with network 'none', lo is down.
            assert await value(kc, "open('/sys/class/net/lo/operstate').read().strip()") == "down"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    asyncio.run(main())


@pytest.mark.parametrize("options, config, message", [
    ((), {"memroy": "1G"}, "ns-kernel: kernel_provisioner config: unknown setting 'memroy'"),
    ((), {"memory": "lots"}, "ns-kernel: kernel_provisioner config: memory: not a size: 'lots'"),
    (("--home=elsewhere",), None, "ns-kernel: launcher options"),
    (("--memory",), None, "ns-kernel: launcher options"),     # argparse: no SystemExit
    (("--no-such-option",), None, "ns-kernel: launcher options"),
    (("--tmp-size=16M",), {"tmp_size": "8M"},
     "ns-kernel: tmp_size set both in kernel.json's argv and in its kernel_provisioner config"),
])
def test_bad_config_is_refused_before_launch(workdir, socket_base, options, config, message):
    async def main():
        km = AsyncKernelManager(kernel_name=spec(socket_base, options, config))
        with pytest.raises(ValueError) as info:
            await km.start_kernel(cwd=workdir)
        assert str(info.value).startswith(message), str(info.value)
        assert not km.has_kernel
    asyncio.run(main())


def test_spec_that_does_not_run_the_launcher_is_refused(workdir, socket_base):
    from jupyter_client.kernelspec import KernelSpecManager
    name = spec(socket_base)
    path = os.path.join(KernelSpecManager().get_kernel_spec(name).resource_dir, "kernel.json")
    import json
    with open(path) as f:
        data = json.load(f)
    data["argv"] = [data["argv"][0], "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    with open(path, "w") as f:
        json.dump(data, f)

    async def main():
        km = AsyncKernelManager(kernel_name=name)
        with pytest.raises(ValueError, match="ns-kernel: ns-kernel-provisioner runs the launcher "
                                             "only: kernel.json argv must be"):
            await km.start_kernel(cwd=workdir)
    asyncio.run(main())


def test_the_provisioner_runs_no_config_code(workdir, socket_base, tmp_path, monkeypatch):
    # ns_kernel_config.py is code: the launcher, a process of its own, runs it; the
    # provisioner, inside the Jupyter server, never does. It reads ns_kernel_config.json,
    # which is data.
    config = tmp_path / "config"
    config.mkdir()
    (config / "ns_kernel_config.py").write_text(
        f"import os\nopen(os.path.join({str(config)!r}, f'ran-{{os.getpid()}}'), 'w').close()\n"
        "c.Sandbox.hostname_prefix = 'frompy'\n")
    (config / "ns_kernel_config.json").write_text(
        json.dumps({"Sandbox": {"socket_dir": socket_base}}))
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(config))

    async def main():
        km, kc = await start(write_spec("prov-config-files", provisioner=True), workdir)
        try:
            assert os.path.dirname(km.provisioner.kernel_socket_dir) == socket_base
            assert (await value(kc, "__import__('socket').gethostname()")).startswith("frompy-")
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    asyncio.run(main())
    ran = sorted(path.name for path in config.glob("ran-*"))
    assert ran and f"ran-{os.getpid()}" not in ran, ran
