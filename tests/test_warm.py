"""Warm start (`--warm`): kernels forked from a per-user template, with the same isolation
as a cold start (test_isolation.py runs every probe on warm kernels too) and nothing
carried from one kernel to the next."""
import os
import shutil
import tempfile
import time

import pytest

from conftest import interrupt_busy_loop, start_kernel, stop_kernel, write_spec
from ns_kernel import warm

WARM = write_spec("isolated-python-warm", ["--warm"])


def gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture(scope="module")
def workdir_module():
    wd = tempfile.mkdtemp(prefix="ns-kernel-warm-")
    os.chmod(wd, 0o777)
    yield wd
    # The template outlives kernels by design; the tests leave nothing running.
    pid = warm.template_pid()
    warm.stop()
    assert pid is None or gone(pid)
    shutil.rmtree(wd, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(workdir_module):
    """The isolation probes (test_isolation.py) run on warm kernels too; here, what is
    particular to the template."""
    a, b = start_kernel(workdir_module, kernel_name=WARM), \
        start_kernel(workdir_module, kernel_name=WARM)
    yield a, b
    stop_kernel(a)
    stop_kernel(b)


def test_kernels_come_from_the_template(pair):
    a, b = pair
    for k in (a, b):
        cmdline = k.value("open('/proc/self/cmdline', 'rb').read().split(b'\\0')")
        assert b"from ns_kernel.warm import template_main" in cmdline[2], cmdline
        assert k.value("__import__('sys').argv[0]").endswith("ipykernel_launcher.py")
    assert warm.template_pid() is not None


def test_no_state_carried_between_kernels(pair, workdir_module):
    a, _ = pair
    a.execute("import json, os; json.leaked = 'from a'; secret = 42; "
              "os.environ['LEAK'] = 'a'")
    assert a.value("secret") == 42
    c = start_kernel(workdir_module, kernel_name=WARM)
    try:
        assert c.value("'secret' in dir()") is False
        assert c.value("hasattr(__import__('json'), 'leaked')") is False
        assert c.value("'LEAK' in __import__('os').environ") is False
        assert c.value("__import__('socket').gethostname()") != \
            a.value("__import__('socket').gethostname()")
        # Caches the template filled on the host must not show the host's name either.
        assert c.value("__import__('platform').node()") == \
            c.value("__import__('socket').gethostname()")
        assert c.value("__import__('platform').node()") != os.uname().nodename
    finally:
        stop_kernel(c)


def test_interrupt_and_restart(workdir_module):
    k = start_kernel(workdir_module, kernel_name=WARM)
    try:
        interrupt_busy_loop(k)
        assert k.value("1 + 1") == 2
        before = k.value("__import__('socket').gethostname()")
        k.execute("x = 1")
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=30)
        assert k.value("'x' in dir()") is False
        assert k.value("__import__('os').getpid()") == 2
        assert k.value("__import__('socket').gethostname()") != before
    finally:
        stop_kernel(k)


def test_kernel_exit_status_and_stop_leave_nothing(workdir_module):
    k = start_kernel(workdir_module, kernel_name=WARM)
    k.kc.execute("import os; os._exit(3)")
    deadline = time.monotonic() + 20
    while k.km.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert k.km.provisioner.process.wait(timeout=5) == 3
    stop_kernel(k)
    pid = warm.template_pid()
    assert pid and warm.stop()
    assert gone(pid)
    assert not os.path.exists(warm.socket_path())
    assert not os.path.exists(warm.socket_path() + ".lock")
    assert warm.template_pid() is None
    # The next warm kernel makes a new template by itself.
    k = start_kernel(workdir_module, kernel_name=WARM)
    try:
        assert k.value("__import__('os').getpid()") == 2
    finally:
        stop_kernel(k)


def test_stop_without_template_says_so(monkeypatch):
    # Another startup environment is another template, and none runs for it.
    monkeypatch.setenv("LANG", "C.UTF-8-no-template-for-this")
    assert warm.stop() is False
