"""Isolated Python in JupyterLab, as users run it: a real JupyterLab (from PyPI) on 127.0.0.1
with a token and an empty root dir, the kernelspec installed by `ns-kernel install`, so the
server starts kernels through the provisioner. Driven through its REST and websocket API
(start, execute, interrupt, restart, delete; two kernels side by side), once by Debian's
Chromium with Playwright, the way a person clicks through it, and through a real JupyterHub
with two users."""
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from conftest import alive, in_pid_namespace, wait_until

BIN = os.path.dirname(sys.executable)
CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches out to the network from a CI machine.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# What every probe cell prints: the hostname, the pid, the entries of /proc; the pids in it.
PROBE = ("import os, socket\n"
         "print(socket.gethostname(), os.getpid(), len(os.listdir('/proc')))\n"
         "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")

# Interrupted once it has printed: a loaded machine may take a while to start it.
LOOP = "print('looping', flush=True)\nwhile True: pass"
LIMITED_MEMORY = "512M"


def parse_probe(text):
    first, second = text.strip().splitlines()
    hostname, pid, entries = first.split()
    return hostname, int(pid), int(entries), json.loads(second)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_spec(top, socket_base):
    """`ns-kernel install` as an admin runs it (and once more with a memory limit); the
    Jupyter data dir that now holds them."""
    prefix = os.path.join(top, "prefix")
    for options in ([], ["--name=isolated-limited", f"--memory={LIMITED_MEMORY}"]):
        subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={prefix}",
                        f"--socket-dir={socket_base}", *options], check=True,
                       capture_output=True)
    return os.path.join(prefix, "share", "jupyter")


def wait_for(what, predicate, proc, log, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log) as f:
                raise RuntimeError(f"{what} did not start:\n{''.join(f.readlines()[-30:])}")
        time.sleep(0.2)


def answers(server, path):
    try:
        server.api("GET", path)
        return True
    except OSError:
        return False


class Server:
    """A Jupyter server's HTTP API: its base URL and a token it accepts."""

    def __init__(self, url, token):
        self.url, self.token = url, token

    def api(self, method, path, body=None):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            return json.loads(data) if data else resp.status


class Lab(Server):
    """A running JupyterLab server and the dirs it was given."""

    def __init__(self, top):
        self.top = top
        self.root = tempfile.mkdtemp(prefix="ns-kernel-lab-root-")
        os.chmod(self.root, 0o777)   # the notebook folder: the sandbox's uid writes there
        self.socket_base = tempfile.mkdtemp(prefix="nsk-")
        self.runtime = os.path.join(top, "runtime")
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(top, "server.log")
        self.proc = None

    def start(self):
        config = os.path.join(self.top, "config")
        # No "get Jupyter news?" toast over the notebook (it would fetch from the internet).
        settings = os.path.join(config, "lab", "user-settings", "@jupyterlab",
                                "apputils-extension")
        os.makedirs(settings)
        with open(os.path.join(settings, "notification.jupyterlab-settings"), "w") as f:
            json.dump({"fetchNews": "false"}, f)
        env = dict(os.environ, JUPYTER_PATH=install_spec(self.top, self.socket_base),
                   JUPYTER_CONFIG_DIR=config, JUPYTER_RUNTIME_DIR=self.runtime,
                   JUPYTER_DATA_DIR=os.path.join(self.top, "data"))
        cmd = [os.path.join(BIN, "jupyter-lab"), "--no-browser", "--ip=127.0.0.1",
               f"--port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               # CurveZMQ between the server and every kernel (jupyter_client >= 8.10).
               "--MappingKernelManager.transport_encryption=required"]
        if os.getuid() == 0:
            cmd.append("--allow-root")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root)
        wait_for("JupyterLab", lambda: answers(self, "/api/status"), self.proc, self.log)
        return self

    def stop(self):
        if self.proc:
            self.proc.terminate()   # the server shuts its kernels down first
            self.proc.wait(timeout=30)
        leftovers = os.listdir(self.socket_base)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.socket_base, ignore_errors=True)
        assert leftovers == [], f"socket dirs left behind: {leftovers}"
        # What stays once JupyterLab has stopped is said as it exits, with how to end it
        # now. (A template may have left before: when something it imported changed.)
        with open(self.log) as f:
            said = [line for line in f.read().splitlines()[-10:]
                    if line.startswith("ns-kernel: the warm template of ")]
        if not said:
            from ns_kernel import warm
            assert warm.template_pid() is None, f"a template stays, unsaid:\n{self.log_tail()}"
            return
        assert said[0].startswith(f"ns-kernel: the warm template of {sys.executable} (pid "), said
        assert said[0].endswith(f"`{sys.executable} -m ns_kernel.warm stop` ends it now"), said

    def log_tail(self):
        with open(self.log) as f:
            return "".join(f.readlines()[-30:])

    def connection(self, kernel_id):
        with open(os.path.join(self.runtime, f"kernel-{kernel_id}.json")) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def lab():
    top = tempfile.mkdtemp(prefix="ns-kernel-lab-")
    server = Lab(top)
    try:
        yield server.start()
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(top, ignore_errors=True)


class Channels:
    """One kernel's websocket, as JupyterLab opens it: every channel over one connection."""

    def __init__(self, server, kernel_id):
        from jupyter_client.session import Session
        self.server, self.kernel_id = server, kernel_id
        self.session = Session()
        self.ws = None

    async def open(self):
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect
        url = (f"ws{self.server.url[4:]}/api/kernels/{self.kernel_id}/channels"
               f"?session_id={self.session.session}")
        self.ws = await websocket_connect(HTTPRequest(
            url, headers={"Authorization": f"token {self.server.token}"}))
        return self

    def request(self, msg_type, content):
        from jupyter_client.jsonutil import json_default
        msg = self.session.msg(msg_type, content)
        msg["channel"] = "shell"
        self.ws.write_message(json.dumps(msg, default=json_default))
        return msg["header"]["msg_id"]

    def send(self, code):
        return self.request("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})

    async def wait_ready(self, timeout=60):
        """After a restart the server's iopub subscription reconnects a moment after shell
        does, and what the kernel publishes before that is lost (ZMQ's slow joiner; the same
        with a plain kernel over tcp): ask for kernel_info until its iopub status comes
        through, as jupyter_client's wait_for_ready does."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.result(self.request("kernel_info_request", {}), timeout=1)
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise

    async def until_printed(self, msg_id, text, timeout=60):
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.read_message(), timeout))
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                    and text in msg["content"]["text"]):
                return

    async def result(self, msg_id, timeout=60):
        """(printed text, error name or None) of the request msg_id: once its reply and
        its idle status are both in."""
        out, error, replied, idle = [], None, False, False
        while not (replied and idle):
            raw = await asyncio.wait_for(self.ws.read_message(), timeout)
            assert raw is not None, "the kernel's websocket closed"
            msg = json.loads(raw)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = msg["content"]["ename"]
            elif msg["channel"] == "shell" and kind.endswith("_reply"):
                replied = True
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        return "".join(out), error

    async def run(self, code):
        return await self.result(self.send(code))

    async def probe(self):
        text, error = await self.run(PROBE)
        assert error is None, text
        return parse_probe(text)

    def close(self):
        self.ws.close()


def assert_sandboxed(probe):
    hostname, pid, entries, pids = probe
    assert hostname.startswith("isolated-") and hostname != socket.gethostname()
    assert pid == 2 and pids == [1, 2]   # init and the kernel: nothing of the host
    host_entries = len(os.listdir("/proc"))
    assert entries < host_entries, (entries, host_entries)


async def in_sandbox(ch):
    """Host pids of the kernel's sandbox: the processes in its pid namespace (the kernel;
    init too where this uid may read its namespace: as root). By namespace, not below
    the server: a warm kernel's are the template's children."""
    ns = (await ch.run("print(__import__('os').readlink('/proc/self/ns/pid'))"))[0].strip()
    found = in_pid_namespace(ns)
    assert found, f"no process in the kernel's pid namespace {ns}"
    return found


def test_rest_and_websocket(lab):
    specs = lab.api("GET", "/api/kernelspecs")["kernelspecs"]
    assert specs["isolated-python"]["spec"]["display_name"] == "Isolated Python"

    async def main():
        kernel_id = lab.api("POST", "/api/kernels", {"name": "isolated-python"})["id"]
        info = lab.connection(kernel_id)
        # The server talks to the kernel's own sockets, in its private socket dir, with
        # CurveZMQ keys (transport_encryption = required: it would not start without).
        assert info["transport"] == "ipc" and len(info["curve_publickey"]) == 40
        box = os.path.dirname(info["ip"])
        assert os.path.dirname(box) == lab.socket_base
        ch = await Channels(lab, kernel_id).open()
        try:
            assert_sandboxed(await ch.probe())
            assert await ch.run("secret = 42; print(secret)") == ("42\n", None)

            busy = ch.send(LOOP)
            await ch.until_printed(busy, "looping")
            assert lab.api("POST", f"/api/kernels/{kernel_id}/interrupt") == 204
            assert (await ch.result(busy))[1] == "KeyboardInterrupt"
            assert await ch.run("print(secret)") == ("42\n", None)   # same kernel, alive

            old = await in_sandbox(ch)
            lab.api("POST", f"/api/kernels/{kernel_id}/restart")
            assert wait_until(lambda: not alive(old)), f"old sandbox survived: {alive(old)}"
            await ch.wait_ready()
            assert_sandboxed(await ch.probe())
            assert (await ch.run("print(secret)"))[1] == "NameError"   # a fresh kernel
            tree = await in_sandbox(ch)
        finally:
            ch.close()
        assert lab.api("DELETE", f"/api/kernels/{kernel_id}") == 204
        assert wait_until(lambda: not alive(tree)), f"still running: {alive(tree)}"
        assert not os.path.lexists(box)
    asyncio.run(main())


def test_kernel_usage_panel_shows_the_sandbox(lab):
    """What jupyter-resource-usage's kernel usage panel fetches, for a kernel with --memory:
    the kernel's numbers, and its limit as the memory total, not the host's."""
    kernel_id = lab.api("POST", "/api/kernels", {"name": "isolated-limited"})["id"]
    try:
        for _ in range(60):     # "loading" until the kernel answers on its control channel
            usage = lab.api("GET", f"/api/metrics/v1/kernel_usage/get_usage/{kernel_id}")
            if "kernel_memory" in usage.get("content", {}):
                break
            time.sleep(0.5)
        content = usage["content"]
        assert content["pid"] == 2 and content["hostname"].startswith("isolated-")
        assert content["kernel_memory"] > 10 << 20
        assert content["host_virtual_memory"]["total"] == 512 << 20
    finally:
        lab.api("DELETE", f"/api/kernels/{kernel_id}")


def test_two_kernels_get_different_sandboxes(lab):
    async def main():
        ids = [lab.api("POST", "/api/kernels", {"name": "isolated-python"})["id"]
               for _ in range(2)]
        a, b = [await Channels(lab, kernel_id).open() for kernel_id in ids]
        try:
            text, error = await a.run(
                "import subprocess; sleeper = subprocess.Popen(['sleep', '60'])\n"
                "open('/tmp/mine', 'w').write('a'); print(sleeper.pid)")
            assert error is None, text
            sleeper = int(text)
            host_a, _, _, pids_a = await a.probe()
            host_b, _, _, pids_b = await b.probe()
            assert pids_a == [1, 2, sleeper] and pids_b == [1, 2]   # b does not see a's sleep
            assert host_a != host_b
            assert await b.run("import os; print(os.path.exists('/tmp/mine'))") == ("False\n",
                                                                                   None)
            assert (await b.run(f"os.kill({sleeper}, 9)"))[1] == "ProcessLookupError"
            assert await a.run("print(sleeper.poll())") == ("None\n", None)   # still running
        finally:
            a.close()
            b.close()
            for kernel_id in ids:
                lab.api("DELETE", f"/api/kernels/{kernel_id}")
    asyncio.run(main())


def test_in_the_browser(lab, tmp_path):
    """Create a notebook, pick Isolated Python, run a cell, interrupt from the toolbar,
    restart from the menu, move a widget's slider, open the kernel usage panel, turn the
    debugger on. NS_KERNEL_SCREENSHOT=docs/screenshot.png refreshes the README's
    picture."""
    if not os.path.exists(CHROMIUM):
        # What the machine does not provide, and how to provide it (scripts/test does it
        # when root runs it).
        pytest.skip(f"no {CHROMIUM}: install it as root with `apt-get install chromium`")
    from playwright.sync_api import expect, sync_playwright
    shot = os.environ.get("NS_KERNEL_SCREENSHOT") or str(tmp_path / "screenshot.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(30000)
            page.goto(f"{lab.url}/lab?token={lab.token}")

            page.get_by_role("menuitem", name="File").click()
            page.locator("li.lm-Menu-item[data-type=submenu]", has_text="New").first.hover()
            page.locator("li[data-command='notebook:create-new']").click()
            picker = page.locator(".jp-Dialog")
            picker.locator("select").select_option(label="Isolated Python")
            picker.get_by_role("button", name="Select").click()
            expect(page.locator(".jp-Notebook")).to_be_visible()
            # As a user does: the first cell once the status bar shows the kernel idle (one
            # run while JupyterLab was still connecting to it was seen never to execute).
            expect(page.get_by_role("button", name="Isolated Python | Idle")).to_be_visible(
                timeout=60000)

            cells = page.locator(".jp-Notebook .jp-Cell")

            def run(code):
                """Type code in the last cell, run it; the locator of its outputs."""
                cell = cells.nth(cells.count() - 1)
                cell.locator(".cm-content").click()
                page.keyboard.type(code)
                page.keyboard.press("Shift+Enter")
                return cell.locator(".jp-OutputArea")

            out = run("secret = 1\n" + PROBE)
            expect(out).to_contain_text("]")
            assert_sandboxed(parse_probe(out.inner_text()))


            out = run(LOOP)
            expect(out).to_contain_text("looping")
            page.get_by_role("button", name="Interrupt the kernel").click()
            expect(out).to_contain_text("KeyboardInterrupt")

            page.get_by_role("menuitem", name="Kernel").click()
            page.locator("li[data-command='kernelmenu:restart']").click()
            page.locator(".jp-Dialog").get_by_role("button", name="Confirm Kernel Restart").click()
            out = run("print('secret' in globals(), __import__('os').getpid(), "
                      "__import__('socket').gethostname())")
            expect(out).to_contain_text("False 2 isolated-")
            page.screenshot(path=shot)

            # Widgets (ipywidgets, of the `lab` extra scripts/lab installs): a slider moved in
            # the browser moves in the kernel, as with a plain Python kernel.
            out = run("import ipywidgets\nslider = ipywidgets.IntSlider(value=3, max=10)\nslider")
            handle = out.locator(".widget-slider .noUi-handle")
            expect(handle).to_be_visible()
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            expect(out.locator(".widget-readout")).to_contain_text("5")
            expect(run("print('slider at', slider.value)")).to_contain_text("slider at 5")

            # jupyter-resource-usage's kernel usage panel (the right sidebar's tachometer)
            # shows this kernel: its sandbox's hostname.
            usage = page.locator(".jp-SideBar [data-id='kernelusage-panel-id']")
            usage.click()
            panel = page.locator(".jp-KernelUsage-view")
            expect(panel).to_contain_text("Kernel Host: isolated-", timeout=60000)
            usage.click()       # closed again: what follows sees the page as before
            expect(panel).to_be_hidden()

            # JupyterLab's debugger, as for a plain Python kernel: the toggle is enabled,
            # and once on, its variables panel shows the kernel's.
            bug = page.locator(".jp-DebuggerBugButton button")
            expect(bug).to_be_enabled()
            bug.click()
            expect(bug).to_have_attribute("aria-pressed", "true")
            expect(run("shown = 40 + 2\nprint(shown)")).to_contain_text("42")
            expect(page.locator(".jp-DebuggerVariables")).to_contain_text("shown")
        finally:
            browser.close()
    assert os.path.getsize(shot) > 10000


HUB_CONFIG = """
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.db_url = "sqlite:///{top}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{top}/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
# Every user's server is a process of the hub's uid, with its own home as notebook folder.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{top}/home/{{username}}"
c.Spawner.environment = {{"JUPYTER_PATH": {jupyter_path!r}}}
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {args!r}
c.JupyterHub.services = [{{"name": "tester", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "tester", "services": ["tester"], "scopes": [
    "admin:users", "admin:servers", "access:servers"]}}]
"""


def test_jupyterhub_two_users():
    """A real JupyterHub (dummy authenticator, local processes, configurable-http-proxy):
    two users each start a server and an Isolated Python kernel in it, through the hub's
    proxy; the kernels are sandboxed and do not see each other."""
    top = tempfile.mkdtemp(prefix="ns-kernel-hub-")
    os.chmod(top, 0o755)   # the homes below are the notebook folders of nobody's kernels
    socket_base = tempfile.mkdtemp(prefix="nsk-")
    users = ["alice", "bob"]
    for user in users:
        os.makedirs(f"{top}/home/{user}")
        os.chmod(f"{top}/home/{user}", 0o777)
    hub = Server(f"http://127.0.0.1:{free_port()}/hub/api", secrets.token_hex(16))
    config = os.path.join(top, "jupyterhub_config.py")
    with open(config, "w") as f:
        f.write(HUB_CONFIG.format(
            port=hub.url.split(":")[2].split("/")[0], hub_port=free_port(),
            proxy_port=free_port(), proxy=os.path.join(BIN, "configurable-http-proxy"),
            singleuser=os.path.join(BIN, "jupyterhub-singleuser"),
            top=top, jupyter_path=install_spec(top, socket_base), token=hub.token,
            args=["--allow-root"] if os.getuid() == 0 else []))
    log = os.path.join(top, "hub.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([os.path.join(BIN, "jupyterhub"), "-f", config], cwd=top,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("JupyterHub", lambda: answers(hub, "/"), proc, log)
        servers = {}
        for user in users:
            hub.api("POST", f"/users/{user}")
            hub.api("POST", f"/users/{user}/server")
            wait_for(f"{user}'s server", lambda: hub.api("GET", f"/users/{user}")
                     ["servers"].get("", {}).get("ready"), proc, log)
            servers[user] = Server(hub.url.replace("/hub/api", f"/user/{user}"), hub.token)

        async def main():
            channels = {}
            for user, server in servers.items():
                kernel_id = server.api("POST", "/api/kernels", {"name": "isolated-python"})["id"]
                channels[user] = await Channels(server, kernel_id).open()
            try:
                for user, ch in channels.items():
                    assert_sandboxed(await ch.probe())
                    assert await ch.run(f"open('/tmp/{user}', 'w').close(); print(os.getcwd())"
                                        ) == (f"{top}/home/{user}\n", None)
                alice, bob = channels["alice"], channels["bob"]
                assert (await alice.probe())[0] != (await bob.probe())[0]   # hostnames
                assert await alice.run("print(os.path.exists('/tmp/bob'))") == ("False\n", None)
                assert await bob.run("print(os.path.exists('/tmp/alice'))") == ("False\n", None)
            finally:
                for ch in channels.values():
                    ch.close()
        asyncio.run(main())
        for user in users:
            hub.api("DELETE", f"/users/{user}/server")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        leftovers = os.listdir(socket_base)
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(socket_base, ignore_errors=True)
    assert leftovers == [], f"socket dirs left behind: {leftovers}"
