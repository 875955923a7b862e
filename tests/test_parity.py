"""What the plain Python kernel offers in today's Jupyter, on Isolated Python's every start
path: JupyterLab's debugger (a debug session at the protocol level: a breakpoint stops the
cell, its variables show, continue resumes), CurveZMQ transport encryption (through the
bridge and on the provisioner's ipc sockets; nobody without the keys reads iopub), the
bridge's refusal of other users' clients, and jupyter-resource-usage's usage request
answered with the sandbox's limits."""
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from conftest import start_kernel, start_paths, stop_kernel, write_spec
from ns_kernel import limits, warm

PATHS = start_paths("parity")
ROOT = os.getuid() == 0


@pytest.fixture(scope="module", autouse=True)
def no_warm_template_left():
    yield
    warm.stop()


@pytest.fixture(scope="module")
def kernel(module_kernel):
    """The tests that take `kernel` only ask it things: they share one."""
    return module_kernel


def kernel_info(kernel):
    content = kernel.reply(kernel.kc.kernel_info())["content"]
    # IPython's banner ends with a random tip.
    return dict(content, banner=content["banner"].split("Tip:")[0])


def test_kernel_info_is_the_plain_kernels(workdir, kernel):
    """What JupyterLab reads from kernel_info (language, help links, the debugger among
    supported features) is what the plain kernel of the same environment says."""
    plain = start_kernel(workdir, kernel_name="python3")
    try:
        assert kernel_info(kernel) == kernel_info(plain)
        assert "debugger" in kernel_info(kernel)["supported_features"]
    finally:
        stop_kernel(plain)


# -- the debugger --------------------------------------------------------------------------

class Debugger:
    """A debug session over the control channel, as JupyterLab's debugger runs it."""

    def __init__(self, kernel):
        self.kc = kernel.kc
        self.seq = 0

    def request(self, command, arguments=None):
        self.seq += 1
        msg = self.kc.session.msg("debug_request", {"type": "request", "seq": self.seq,
                                                    "command": command,
                                                    "arguments": arguments or {}})
        self.kc.control_channel.send(msg)
        while True:
            reply = self.kc.control_channel.get_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                break
        assert reply["content"].get("success"), (command, reply["content"])
        return reply["content"].get("body", {})

    def event(self, name, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["msg_type"] == "debug_event" and msg["content"].get("event") == name:
                return msg["content"]
        raise AssertionError(f"no {name} debug_event")


CELL = "def add(a, b):\n    total = a + b\n    return total\n\nprint('sum', add(2, 40))\n"


@pytest.mark.parametrize("path", PATHS)
def test_debugger_stops_at_a_breakpoint_shows_variables_and_continues(workdir, path):
    k = start_kernel(workdir, kernel_name=PATHS[path])
    try:
        assert k.km.kernel_spec.metadata["debugger"] is True
        dbg = Debugger(k)
        dbg.request("initialize", {"clientID": "test", "clientName": "test",
                                   "adapterID": "python", "pathFormat": "path",
                                   "linesStartAt1": True, "columnsStartAt1": True,
                                   "supportsVariableType": True, "locale": "en"})
        dbg.request("attach")
        source = dbg.request("dumpCell", {"code": CELL})["sourcePath"]
        placed = dbg.request("setBreakpoints", {"source": {"path": source},
                                                "breakpoints": [{"line": 2}],
                                                "sourceModified": False})
        assert placed["breakpoints"][0]["verified"]
        dbg.request("configurationDone")
        msg_id = k.kc.execute(CELL)
        stopped = dbg.event("stopped")
        assert stopped["body"]["reason"] == "breakpoint"
        thread = stopped["body"]["threadId"]
        frame = dbg.request("stackTrace", {"threadId": thread})["stackFrames"][0]
        assert frame["line"] == 2 and frame["name"] == "add"
        scopes = dbg.request("scopes", {"frameId": frame["id"]})["scopes"]
        local = next(s for s in scopes if s["name"] == "Locals")
        variables = dbg.request("variables",
                                {"variablesReference": local["variablesReference"]})
        shown = {v["name"]: v["value"] for v in variables["variables"]}
        assert shown["a"] == "2" and shown["b"] == "40"
        dbg.request("continue", {"threadId": thread})
        assert k.reply(msg_id, timeout=60)["content"]["status"] == "ok"
        dbg.request("disconnect", {"restart": False, "terminateDebuggee": True})
        assert k.value("add(1, 1)") == 2     # the kernel goes on, undebugged
    finally:
        stop_kernel(k)


# -- CurveZMQ and who may read iopub --------------------------------------------------------

# A plain SUB socket: what any local process can open. It says what came of its connection
# (a handshake done, the subscription right behind it on the same stream; or one refused: by
# Curve, or by the bridge closing it), then counts how often `marker` shows in what it reads
# from iopub, until it reads `end` (the cell's last line) or the test closes its stdin.
EAVESDROP = """
import sys, zmq
from zmq.utils.monitor import recv_monitor_message
endpoint, marker, end = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
sub = zmq.Context().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.LINGER, 0)
monitor = sub.get_monitor_socket()
sub.connect(endpoint)
refused = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
while monitor.poll(30000):
    event = recv_monitor_message(monitor)["event"]
    if event & (zmq.EVENT_HANDSHAKE_SUCCEEDED | refused):
        print("connected" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused", flush=True)
        break
else:
    print("no answer", flush=True)
poller = zmq.Poller()
poller.register(sub, zmq.POLLIN)
poller.register(sys.stdin.fileno(), zmq.POLLIN)
seen, done = 0, False
while not done:
    events = dict(poller.poll(60000))
    done = not events or sys.stdin.fileno() in events    # closed: the test stopped listening
    while sub.poll(0):
        frames = sub.recv_multipart()
        seen += sum(frame.count(marker) for frame in frames)
        done = done or any(end in frame for frame in frames)
print(seen, flush=True)
"""


def iopub_endpoint(kernel):
    info = kernel.km.get_connection_info()
    if info["transport"] == "ipc":
        return f"ipc://{info['ip']}-{info['iopub_port']}"
    return f"tcp://{info['ip']}:{info['iopub_port']}"


def eavesdrop(kernel, uid=None):
    """What came of a plain SUB socket's connection to the kernel's iopub ("connected" or
    "refused"), and how many of the kernel's output lines it read while a cell printed 30."""
    marker, end = uuid.uuid4().hex, uuid.uuid4().hex
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    proc = subprocess.Popen([sys.executable, "-c", EAVESDROP, iopub_endpoint(kernel), marker,
                             end], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd="/", **ids)
    try:
        status = proc.stdout.readline().strip()
        # The code shows on iopub too (execute_input): it holds each marker in two halves.
        out, error, _ = kernel.execute(
            f"import time\nfor _ in range(30):\n    print({marker[:16]!r} + {marker[16:]!r}, "
            f"flush=True)\n    time.sleep(0.02)\nprint({end[:16]!r} + {end[16:]!r})")
        assert error is None and out.count(marker) == 30    # the kernel's own client reads
        if status == "connected":
            # Until it has read the last line: what the publisher sent it too, in order.
            seen = proc.stdout.readline()
        else:
            seen = proc.communicate(timeout=60)[0]
        return status, int(seen)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("encryption", ["disabled", "required"])
def test_curve_keeps_iopub_from_a_client_without_the_keys(workdir, path, encryption):
    k = start_kernel(workdir, kernel_name=PATHS[path], transport_encryption=encryption)
    try:
        info = k.km.get_connection_info()
        assert ("curve_publickey" in info) == (encryption == "required")
        assert k.value("__import__('os').getpid()") == 2
        # Our own uid, so the bridge lets it in: only Curve can keep it out.
        seen = eavesdrop(k)
        assert seen == (("refused", 0) if encryption == "required" else ("connected", 30))
        # And the kernel itself uses the keys: its connection file inside has them.
        inside = k.value("__import__('json').load(open('/run/ns-kernel/connection.json'))"
                         ".get('curve_publickey')")
        assert inside == info.get("curve_publickey")
        if encryption == "required":
            # A restart keeps the keys (jupyter_client reuses them) and the sandbox takes them.
            k.km.restart_kernel()
            k.kc.wait_for_ready(timeout=60)
            assert k.km.get_connection_info()["curve_publickey"] == info["curve_publickey"]
            assert k.value("__import__('os').getpid()") == 2
    finally:
        stop_kernel(k)


@pytest.mark.skipif(not ROOT, reason="a process of another uid needs root to start it")
@pytest.mark.parametrize("encryption, clients, reads", [
    ("disabled", "owner", False),   # the bridge refuses the other user
    ("required", "any", False),     # Curve alone keeps it out
    ("disabled", "any", True),      # a plain kernel's exposure: shows the test can fail
])
def test_another_user_reads_nothing_from_iopub(workdir, capfd, encryption, clients, reads):
    name = write_spec(f"parity-clients-{clients}", [f"--Sandbox.tcp_clients={clients}"])
    k = start_kernel(workdir, kernel_name=name, transport_encryption=encryption)
    try:
        assert k.km.get_connection_info()["transport"] == "tcp"     # through the bridge
        seen = eavesdrop(k, uid=65534)
    finally:
        stop_kernel(k)
    assert seen == (("connected", 30) if reads else ("refused", 0))
    refusals = [line for line in capfd.readouterr().err.splitlines() if "refused" in line]
    if clients == "owner":
        assert len(refusals) == 1, refusals     # said once, however often it retries
        assert refusals[0].startswith("ns-kernel: kernel ")
        assert "from uid 65534: only the kernel owner's clients may connect" in refusals[0]
    else:
        assert refusals == []


@pytest.mark.parametrize("listen, connect", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                             ("::", "127.0.0.1")])
def test_the_owner_of_a_loopback_client_is_found(listen, connect):
    """peer.refused, as the bridge asks it (an IPv4 client of a dual-stack listener too)."""
    from ns_kernel import peer
    import socket
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((listen, 0))
        listener.listen()
        with socket.socket(socket.AF_INET6 if ":" in connect else socket.AF_INET) as client:
            client.connect((connect, listener.getsockname()[1]))
            accepted, _ = listener.accept()
            with accepted:
                assert peer.refused(accepted, {os.getuid()}) is None
                assert peer.refused(accepted, {os.getuid() + 1}) == f"uid {os.getuid()}"


# -- jupyter-resource-usage's kernel usage request ------------------------------------------

def usage(kernel):
    """What jupyter-resource-usage's KernelUsageHandler asks: usage_request on control."""
    msg = kernel.kc.session.msg("usage_request", {})
    kernel.kc.control_channel.send(msg)
    while True:
        reply = kernel.kc.control_channel.get_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["msg_type"] == "usage_reply"
            return reply["content"]


def cgroup_usable():
    return limits.first_usable(limits.probe())[0] != "rlimit"


# Half a CPU more than the host has: the count shown (rounded up) is then the limit's, never
# the host's by chance.
CPUS = psutil.cpu_count() + 0.5
LIMITED = start_paths("parity-limited", ["--memory=768M", f"--cpus={CPUS:g}", "--best-effort"])


@pytest.mark.parametrize("path", LIMITED)
def test_usage_request_answers_with_the_sandbox_limits(workdir, path):
    k = start_kernel(workdir, kernel_name=LIMITED[path])
    try:
        before = usage(k)
        assert before["pid"] == 2 and before["kernel_memory"] > 10 << 20
        memory = before["host_virtual_memory"]
        assert memory["total"] == 768 << 20     # enforced by every backend, rlimit too
        assert 0 < memory["used"] < memory["total"]
        assert memory["available"] == memory["total"] - memory["used"]
        # CPU needs a cgroup: with rlimits it is not enforced, so not shown (best_effort).
        assert before["cpu_count"] == psutil.cpu_count() + (1 if cgroup_usable() else 0)
        # 200 MB more, half in the kernel and half in its /tmp (a tmpfs): both count.
        k.execute("block = bytearray(100 << 20)\n"
                  "open('/tmp/big', 'wb').write(bytes(100 << 20))")
        after = usage(k)["host_virtual_memory"]
        assert after["used"] - memory["used"] > 180 << 20
        assert after["percent"] == round(100 * after["used"] / after["total"], 1)
    finally:
        stop_kernel(k)


def test_usage_request_without_limits_is_the_plain_kernels(kernel):
    content = usage(kernel)
    assert content["pid"] == 2 and content["kernel_memory"] > 10 << 20
    # Nothing to say instead of the host's: as a plain kernel answers.
    assert content["host_virtual_memory"]["total"] == psutil.virtual_memory().total
    assert content["cpu_count"] == psutil.cpu_count()
