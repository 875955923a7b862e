"""The prestarted interpreter (prestart.py): the kernel it becomes is the one init would
have exec'd, in the same sandbox; where it could not be faithful the kernel execs; it
never outlives its launcher, and nothing of the notebook's folder runs outside."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from jupyter_client.manager import KernelManager

from conftest import (COLD_NAME, COMMAND_LINE, KERNEL_NAME, STARTED, Kernel, descendants,
                      start_kernel, stop_kernel, stop_templates, stray_prestarted, wait_until,
                      write_spec)

EXEC_SPEC = write_spec("isolated-python-exec", ["--no-prestart"])


def started_how(k):
    return k.value(STARTED)


def test_kernel_is_the_prestarted_interpreter(workdir):
    k = start_kernel(workdir, kernel_name=COLD_NAME)
    try:
        assert started_how(k) == "prestarted"
        assert k.value("(__import__('os').getpid(), __import__('os').getppid())") == (2, 1)
        assert k.value("__import__('sys').argv[0]").endswith("ipykernel_launcher.py")
        # The interpreter and its helper are gone: the launcher's tree is monitor, init,
        # kernel, as after an exec.
        assert len(descendants(k.km.provisioner.process.pid)) == 3
        assert not stray_prestarted()
    finally:
        stop_kernel(k)


# What a program inside could see of how its kernel was started: its command line too.
PROFILE = ("(dict(__import__('os').environ), __import__('os').getcwd(), __import__('sys').path,"
           f" {COMMAND_LINE},"
           " tuple(__import__('sys').flags), [l for l in open('/proc/self/status').read()"
           ".splitlines() if l.startswith(('Uid', 'Gid', 'Groups', 'Cap', 'NoNewPrivs', 'Sig',"
           " 'Seccomp'))"
           # SigQ: signals queued for the whole uid at that instant, not this process's.
           " and not l.startswith('SigQ')], open('/proc/self/limits').read(),"
           " (lambda m: (__import__('os').umask(m), m)[1])(__import__('os').umask(0)),"
           " __import__('sys').executable, __import__('sys').prefix,"
           # What is installed: the versions and files of what the template imported.
           " [(m.__name__, m.__version__, m.__file__) for m in map(__import__, ('ipykernel',"
           " 'IPython', 'zmq', 'traitlets', 'jupyter_client'))])")
PROVISIONED = write_spec("isolated-python-provisioned-warm", provisioner=True)
PROVISIONED_EXEC = write_spec("isolated-python-provisioned-exec", ["--no-prestart"],
                              provisioner=True)


def test_preloaded_kernels_look_like_an_exec_d_one(workdir):
    # Prestarted and warm kernels both run ipykernel in an interpreter started outside;
    # warm is the default on the argv path and on the provisioner's.
    seen = {}
    try:
        for how, name in (("prestarted", COLD_NAME), ("exec", EXEC_SPEC), ("warm", KERNEL_NAME),
                          ("warm provisioned", PROVISIONED),
                          ("exec provisioned", PROVISIONED_EXEC)):
            k = start_kernel(workdir, kernel_name=name)
            try:
                assert started_how(k) == how.split()[0]
                seen[how] = k.value(PROFILE)
            finally:
                stop_kernel(k)
    finally:
        stop_templates()
    for profile in seen.values():
        profile[0].pop("JPY_SESSION_NAME", None)    # per kernel
    assert seen["prestarted"] == seen["exec"]
    assert seen["warm"] == seen["exec"]
    assert seen["warm provisioned"] == seen["exec provisioned"]


def find_interpreter(launcher):
    """The launcher's prestarted interpreter while it imports (None once it has joined)."""
    found = []

    def look():
        for p in descendants(launcher):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"ns_kernel.prestart" in f.read():
                        found.append(p)
                        return True
            except OSError:
                pass
        return False
    deadline = time.monotonic() + 5
    while not look() and time.monotonic() < deadline:
        time.sleep(0.002)
    return found[0] if found else None


def test_interpreter_has_its_own_session(workdir):
    # Jupyter interrupts and restarts with a killpg of the launcher's group: that is for
    # the launcher, which forwards it; an interpreter still importing must not get it.
    km = KernelManager(kernel_name=COLD_NAME)
    km.start_kernel(cwd=workdir)
    try:
        launcher = km.provisioner.process.pid
        interpreter = find_interpreter(launcher)
        assert interpreter is not None
        assert os.getsid(interpreter) == interpreter != os.getsid(launcher)
    finally:
        km.shutdown_kernel(now=True)
    assert wait_until(lambda: not stray_prestarted(), timeout=3)


def test_interpreter_killed_before_joining_means_exec(workdir):
    km = KernelManager(kernel_name=COLD_NAME)
    km.start_kernel(cwd=workdir)
    try:
        interpreter = find_interpreter(km.provisioner.process.pid)
        assert interpreter is not None
        os.kill(interpreter, signal.SIGKILL)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        try:
            k = Kernel(km, kc)
            assert started_how(k) == "exec"
            assert k.value("__import__('os').getpid()") == 2
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel()


def test_no_prestart_option_execs(workdir):
    k = start_kernel(workdir, kernel_name=EXEC_SPEC)
    try:
        assert started_how(k) == "exec"
        assert k.value("__import__('os').getpid()") == 2
        assert len(descendants(k.km.provisioner.process.pid)) == 3
    finally:
        stop_kernel(k)


@pytest.mark.parametrize("kernel_name", [COLD_NAME, KERNEL_NAME])
def test_prestart_off_in_a_config_file(workdir, tmp_path, monkeypatch, kernel_name):
    # Warm (the default) or cold: the kernel execs a fresh interpreter.
    os.chmod(tmp_path, 0o755)
    (tmp_path / "ns_kernel_config.py").write_text("c.KernelApp.prestart = False\n")
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path))
    k = start_kernel(workdir, kernel_name=kernel_name)
    try:
        assert started_how(k) == "exec"
        assert wait_until(lambda: not stray_prestarted(), timeout=3)
    finally:
        stop_kernel(k)


@pytest.mark.parametrize("kernel_name", [COLD_NAME, KERNEL_NAME])
def test_a_denied_startup_variable_means_exec(workdir, monkeypatch, kernel_name):
    # The interpreter (or template) started with PYTHON* as the launcher had them; the plan
    # denies this one (*TOKEN*), so an interpreter started with it is not what the kernel
    # may be.
    monkeypatch.setenv("PYTHON_API_TOKEN", "secret")
    k = start_kernel(workdir, kernel_name=kernel_name)
    try:
        assert started_how(k) == "exec"
        assert k.value("'PYTHON_API_TOKEN' in __import__('os').environ") is False
    finally:
        stop_kernel(k)
        stop_templates()


@pytest.mark.parametrize("kernel_name", [COLD_NAME, EXEC_SPEC, KERNEL_NAME])
def test_nothing_of_the_notebook_folder_runs_outside(tmp_path, kernel_name):
    # A kernel may write its folder; a module it planted there must never be imported by
    # the launcher, the prestarted interpreter or the warm template, which run outside.
    # Inside, a fresh interpreter imports from its folder as a plain kernel would.
    os.chmod(tmp_path, 0o777)
    outside = tmp_path.parent / f"planted-{tmp_path.name}"
    planted = f"import os; open({str(outside)!r}, 'w').close() if os.getpid() > 2 else None\n"
    for name in ("traitlets", "ipykernel", "IPython", "zmq", "json", "ns_kernel", "selectors"):
        (tmp_path / f"{name}.py").write_text(planted)
    (tmp_path / "ns_kernel").mkdir()
    (tmp_path / "ns_kernel" / "__init__.py").write_text(planted)
    k = start_kernel(str(tmp_path), kernel_name=kernel_name)
    try:
        assert k.value("6 * 7") == 42
    finally:
        stop_kernel(k)
        stop_templates()
    assert not outside.exists()


def test_launcher_killed_before_the_sandbox_leaves_no_interpreter(tmp_path):
    # A launcher that fails at once (no such connection file) must take its interpreter.
    proc = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "--cold", "-f",
                           str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "none.json" in proc.stderr
    assert wait_until(lambda: not stray_prestarted(), timeout=3), stray_prestarted()


# A command under a seccomp filter that denies `names` alone (as a container's may), then
# exec'd: everything it starts inherits the filter.
DENY = """
import errno, os, sys
from ns_kernel import seccomp
from ns_kernel.syscalls import set_no_new_privs
lib = seccomp._library()
ctx = lib.seccomp_init(seccomp.SCMP_ACT_ALLOW)
for name in sys.argv[1].split(","):
    lib.seccomp_rule_add(ctx, seccomp.SCMP_ACT_ERRNO(errno.EPERM),
                         lib.seccomp_syscall_resolve_name(name.encode()), 0)
set_no_new_privs()
assert lib.seccomp_load(ctx) == 0
os.execvp(sys.argv[2], sys.argv[2:])
"""


def denying(*names):
    """The argv prefix that runs a command under a filter denying `names`."""
    return [sys.executable, "-P", "-c", DENY, ",".join(names)]


LAUNCHER = [sys.executable, "-P", "-m", "ns_kernel"]
REFUSALS = {
    # what any launcher meets under a filter like Docker's or podman's without setns
    "seccomp denies setns": [*denying("setns"), *LAUNCHER],
    # a container's root: no CAP_SYS_PTRACE, and init (nobody by then) is another uid
    "root without CAP_SYS_PTRACE": ["setpriv", "--inh-caps=-sys_ptrace",
                                    "--bounding-set=-sys_ptrace", *LAUNCHER],
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_setns_refused_means_exec(workdir, refusal):
    if refusal.startswith("root") and os.geteuid() != 0:
        pytest.skip("only host root can drop a capability it has")
    from ns_kernel import kernelspec
    from conftest import _DATA
    spec = kernelspec.kernel_dict(["--cold"], provisioner=False)   # a prestarted interpreter
    spec["argv"] = [*REFUSALS[refusal], *spec["argv"][4:]]
    name = f"isolated-python-{refusal.replace(' ', '-')}"
    kernelspec.write_kernel_spec(os.path.join(_DATA, "kernels", name), spec)
    with tempfile.TemporaryFile("w+") as log:
        k = start_kernel(workdir, kernel_name=name, stderr=log)
        try:
            assert started_how(k) == "exec"
            assert k.value("(__import__('os').getpid(), __import__('os').getppid())") == (2, 1)
            # The prestarted interpreter tried and gave way: it is gone, and it said nothing.
            assert wait_until(lambda: not stray_prestarted(), timeout=3)
        finally:
            stop_kernel(k)
        log.seek(0)
        said = log.read()
    # The limits line is every kernel's; no other line: the fallback is no error.
    assert [line for line in said.splitlines()
            if line.startswith("ns-kernel:") and " limits: " not in line] == []
