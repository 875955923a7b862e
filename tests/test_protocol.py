"""Everything a plain ipykernel does, through the sandbox: jupyter_kernel_test's whole suite
plus comms, stdin, update_display, heartbeat and extra argv."""
import tempfile
import time
import unittest

import jupyter_kernel_test
import pytest

from conftest import KERNEL_NAME, start_kernel


@pytest.fixture(scope="module")
def kernel(module_kernel):
    """The tests below that take `kernel` only run code in it: they share one (none
    interrupts, restarts, kills or limits it)."""
    return module_kernel


class IsolatedPythonKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = KERNEL_NAME
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise RuntimeError('oops')"
    code_execute_result = [{"code": "1+2+3", "result": "6"},
                           {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    # "range" fails identically against a plain ipykernel 7.4 (session 0 vs 1): not ours.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def setUpClass(cls):
        # jupyter_kernel_test's own, with the launcher's lines kept: if the kernel dies
        # before it answers, the failure says what it said and how it ended.
        with tempfile.TemporaryFile("w+") as log:     # the launcher has its own copy
            try:
                kernel = start_kernel(None, kernel_name=cls.kernel_name, stderr=log)
            except Exception as exc:
                log.seek(0)
                raise AssertionError(f"the kernel did not start ({exc}); its lines:\n"
                                     f"{log.read()[-4000:]}") from exc
        cls.km, cls.kc = kernel.km, kernel.kc

    def test_runs_isolated(self):
        # Every test above ran against this kernel: make sure it really was the sandbox.
        reply, output = self.execute_helper("import os; print(os.getpid())")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual([m["content"]["text"] for m in output if m["msg_type"] == "stream"],
                         ["2\n"])


def test_stdin_input(kernel):
    out, error, msgs = kernel.execute("x = input('name? '); print('got', x)", stdin="ada")
    assert error is None
    assert "got ada" in out
    assert any(m["msg_type"] == "input_request" and m["content"]["prompt"] == "name? "
               for m in msgs)


def test_update_display(kernel):
    code = ("from IPython.display import display, update_display\n"
            "display('first', display_id='d1')\nupdate_display('second', display_id='d1')")
    _, error, msgs = kernel.execute(code)
    assert error is None
    kinds = [(m["msg_type"], m["content"]["data"]["text/plain"]) for m in msgs
             if m["msg_type"] in ("display_data", "update_display_data")]
    assert kinds == [("display_data", "'first'"), ("update_display_data", "'second'")]


def test_comm_round_trip(kernel):
    # A kernel-side comm target echoes what the client sends: the widgets' transport.
    _, error, _ = kernel.execute(
        "def _target(comm, open_msg):\n"
        "    @comm.on_msg\n"
        "    def _echo(msg):\n"
        "        comm.send({'echo': msg['content']['data']['value']})\n"
        "get_ipython().kernel.comm_manager.register_target('echo', _target)")
    assert error is None
    kc = kernel.kc
    comm_id = "c0ffee"
    kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "echo",
                                                       "data": {}}))
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id,
                                                      "data": {"value": 42}}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
            assert msg["content"]["data"] == {"echo": 42}
            break
    else:
        raise AssertionError("no comm_msg echoed")
    reply = kc.comm_info(target_name="echo", reply=True, timeout=20)
    assert comm_id in reply["content"]["comms"]


def test_heartbeat(kernel):
    # A ping of our own on the heartbeat socket comes back, as a client's does (the
    # client's hb channel counts as beating before its first answer: no proof of one).
    import zmq
    sock = kernel.kc.context.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(kernel.kc._make_url("hb"))
        for beat in (b"ping-1", b"ping-2"):
            sock.send(beat)
            assert sock.poll(20000), "no answer on the heartbeat socket"
            assert sock.recv() == beat
    finally:
        sock.close()
    assert kernel.kc.hb_channel.is_beating()
    assert kernel.km.is_alive()


def test_extra_argv_reaches_ipykernel(workdir):
    from conftest import start_kernel, stop_kernel
    k = start_kernel(workdir, extra_arguments=["--HistoryManager.hist_file=:memory:",
                                               "--IPKernelApp.code_to_run=flag = 'set by argv'"])
    try:
        assert k.value("get_ipython().history_manager.hist_file") == ":memory:"
        assert k.value("flag") == "set by argv"
    finally:
        stop_kernel(k)


if __name__ == "__main__":
    unittest.main()
