"""Everyday notebook commands (`!cmd`, `%pip`, `%%bash`, a pty, matplotlib, widgets,
input(), the debugger): notebooks/everyday.ipynb runs on the plain Python kernel and on
every way Isolated Python starts, and the outputs must match cell by cell. Then what
%pip installs: where it goes, that it survives a restart, and who sees it; and what a
kernel leaves where nothing is kept."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import nbformat
import pytest

from conftest import STARTED, make_wheel, start_kernel, start_paths, stop_kernel, write_spec

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "everyday.ipynb")
PATHS = start_paths("everyday")


def run_cells(kernel):
    """Each code cell's outputs, as what a reader sees: stream text, results, the kinds
    of rich output, errors; then the debugger's initialize reply."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    seen = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        stdin = "ada" if "input(" in cell.source else None
        out, error, msgs = kernel.execute(cell.source, timeout=120, stdin=stdin)
        shown = [out.replace("\r\n", "\n")]
        for m in msgs:
            if m["msg_type"] == "execute_result":
                shown.append(m["content"]["data"]["text/plain"])
            if m["msg_type"] in ("execute_result", "display_data"):
                shown.append(sorted(m["content"]["data"]))
        shown.append(error)
        seen.append((cell.source.splitlines()[0], shown))
    kernel.kc.control_channel.send(kernel.kc.session.msg("debug_request", {
        "type": "request", "seq": 1, "command": "initialize",
        "arguments": {"clientID": "test", "adapterID": "python", "pathFormat": "path"}}))
    reply = kernel.kc.control_channel.get_msg(timeout=30)
    seen.append(("debugger", [reply["content"].get("success")]))
    return seen


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    wd = tmp_path_factory.mktemp("plain")
    k = start_kernel(str(wd), kernel_name="python3")
    # Where the plain kernel's debugger keeps its cells, which ipykernel leaves behind (an
    # isolated kernel's vanishes with its /tmp).
    debugger_dir = os.path.join(tempfile.gettempdir(), f"ipykernel_{k.km.provisioner.pid}")
    try:
        yield run_cells(k)
    finally:
        stop_kernel(k)
        shutil.rmtree(debugger_dir, ignore_errors=True)


@pytest.mark.parametrize("path", PATHS)
def test_everyday_commands_match_the_plain_kernel(plain, workdir, path):
    k = start_kernel(workdir, kernel_name=PATHS[path])
    try:
        assert k.value("__import__('os').getpid()") == 2      # really the sandbox
        isolated = run_cells(k)
    finally:
        stop_kernel(k)
    # Each must have worked at all, not failed the same way on both.
    out = dict(isolated)
    assert out["!echo hello from a shell"][0] == "hello from a shell\n"
    assert out["%%bash"][0] == "bash says 42\nto stderr\n"
    assert out["import pexpect"][0] == "pexpect ok\n"
    assert out["import os, pty, subprocess"][0] == "stdin is a tty True\n"
    assert "Name: ipykernel" in out["%pip show ipykernel"][0]
    assert ["image/png", "text/plain"] in out["%matplotlib inline"]
    assert ["application/vnd.jupyter.widget-view+json", "text/plain"] in out["import ipywidgets"]
    assert out["name = input('your name? ')"][0] == "hello ada\n"
    assert out["debugger"] == [True]
    assert isolated == plain


def test_a_pty_in_ns_kernel_run(workdir):
    code = "import os, pty; m, s = pty.openpty(); print(os.ttyname(s))"
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--", sys.executable,
                           "-c", code], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/dev/pts/0\n"


def test_ptys_per_kernel_are_capped(kernel):
    # The host-wide pool of ptys is shared by every kernel: one must not drain it.
    got = kernel.value("len([__import__('pty').openpty() for _ in range(64)])")
    assert got == 64
    out, error, _ = kernel.execute("import pty; pty.openpty()")
    assert error == "OSError", out


# -- %pip install ------------------------------------------------------------------------

def started(workdir, spec):
    k = start_kernel(workdir, kernel_name=spec)
    k.execute("import os, sys")
    return k


def pip(kernel, args):
    out, error, _ = kernel.execute(f"%pip {args}", timeout=180)
    assert error is None, out
    return out


@pytest.fixture
def state_dir(tmp_path):
    """Where this test's kernelspecs keep their homes and packages."""
    path = tmp_path / "state"
    os.chmod(tmp_path, 0o755)
    yield str(path)


def test_pip_install_persists_for_the_same_kernelspec_only(workdir, state_dir):
    make_wheel(workdir, "nskdemo", "1.0", "VERSION = '1.0'")
    make_wheel(workdir, "nskdemo", "2.0", "VERSION = '2.0'")
    spec = write_spec("pip-a", [f"--Sandbox.state_dir={state_dir}", "--Sandbox.kernel_name=a"])
    other = write_spec("pip-b", [f"--Sandbox.state_dir={state_dir}", "--Sandbox.kernel_name=b"])
    k = started(workdir, spec)
    try:
        out = pip(k, "install --no-index ./nskdemo-1.0-py3-none-any.whl")
        assert "Successfully installed nskdemo-1.0" in out
        assert "no network" not in out           # a local wheel needs none
        assert k.value("__import__('nskdemo').VERSION") == "1.0"   # without a restart
        prefix = k.value("os.environ['PIP_PREFIX']")
        assert k.value("__import__('nskdemo').__file__").startswith(prefix + "/lib/")
        assert k.value("__import__('sys').prefix") + "/user" == prefix
        # Its console script is on PATH; the environment's own packages stay read-only.
        assert k.execute("!nskdemo")[0].strip() == "1.0"
        out = pip(k, "uninstall -y ipykernel")
        assert "Read-only file system" in out or "Permission denied" in out, out
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        k.execute("import os, sys")
        assert k.value("__import__('nskdemo').VERSION") == "1.0"   # kept across a restart
        # pip upgrades and uninstalls what it put there, as in any environment.
        out = pip(k, "install --no-index ./nskdemo-2.0-py3-none-any.whl")
        assert "Successfully uninstalled nskdemo-1.0" in out, out
        assert k.value("[d.version for d in __import__('importlib.metadata').metadata"
                       ".distributions() if d.metadata['Name'] == 'nskdemo']") == ["2.0"]
        out = pip(k, "uninstall -y nskdemo")
        assert "Successfully uninstalled nskdemo-2.0" in out, out
        pip(k, "install --no-index ./nskdemo-1.0-py3-none-any.whl")
    finally:
        stop_kernel(k)
    # A new kernel of the same kernelspec, on each start path, has it; another has not.
    for options in ([], ["--no-prestart"], ["--cold"]):
        same = write_spec(f"pip-a{''.join(options)}",
                          [f"--Sandbox.state_dir={state_dir}", "--Sandbox.kernel_name=a", *options])
        k = start_kernel(workdir, kernel_name=same)
        try:
            assert k.value("__import__('nskdemo').VERSION") == "1.0", options
        finally:
            stop_kernel(k)
    k = start_kernel(workdir, kernel_name=other)
    try:
        out, error, _ = k.execute("import nskdemo")
        assert error == "ModuleNotFoundError"
    finally:
        stop_kernel(k)
    # Other users: the state is the user's own, 0700 (root's kernels: the sandbox uid's).
    for name in ("a", "b"):
        info = os.stat(os.path.join(state_dir, name))
        assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o700)


# A module of the standard library's name that still does that module's job.
SHIM = """import importlib.util, os, sysconfig
_spec = importlib.util.spec_from_file_location(
    "_stdlib", os.path.join(sysconfig.get_paths()["stdlib"], "%s.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
VERSION = 'mine'"""


def test_a_package_installed_over_a_preloaded_one_means_exec(workdir, state_dir):
    # The prestarted interpreter imported the standard `mimetypes`; a package of
    # that name installed by the user must win, as it would in a fresh interpreter.
    make_wheel(workdir, "mimetypes", "9.0", SHIM % "mimetypes")
    spec = write_spec("pip-shadow", [f"--Sandbox.state_dir={state_dir}"])
    k = start_kernel(workdir, kernel_name=spec)
    try:
        pip(k, "install --no-index ./mimetypes-9.0-py3-none-any.whl")
    finally:
        stop_kernel(k)
    k = start_kernel(workdir, kernel_name=spec)
    try:
        assert k.value("__import__('mimetypes').VERSION") == "mine"
        assert k.value(STARTED) == "exec"
    finally:
        stop_kernel(k)


def test_pip_without_network_fails_at_once_and_says_why(kernel):
    # Without --retries: pip gives up at once (no network to come back), and the hint
    # follows its error.
    out, error, _ = kernel.execute(
        "%pip install --index-url https://pypi.invalid/simple nosuchpackage-ns-kernel",
        timeout=120)
    assert "Retrying" not in out, out
    hint = "ns-kernel: this kernel has no network, so pip cannot reach a remote index"
    assert hint in out and out.index(hint) > out.index("No matching distribution"), out
    assert "--network proxy --allow pypi" in out
    # What needs no index says nothing of one.
    out, error, _ = kernel.execute("%pip install pip", timeout=120)
    assert "Requirement already satisfied" in out and "no network" not in out, out


# -- files: kept, or reported ------------------------------------------------------------

def test_home_persists_and_is_not_the_real_home(workdir, state_dir):
    spec = write_spec("home-persistent", [f"--Sandbox.state_dir={state_dir}"])
    k = started(workdir, spec)
    try:
        k.execute("open(os.path.expanduser('~/results.csv'), 'w').write('1,2\\n')")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        k.execute("import os")
        assert k.value("open(os.path.expanduser('~/results.csv')).read()") == "1,2\n"
        assert k.value("[n for n in os.listdir(os.path.expanduser('~')) "
                       "if not n.startswith('.')]") == ["results.csv"]
    finally:
        stop_kernel(k)
    with open(os.path.join(state_dir, "isolated-python", "home", "results.csv")) as f:
        assert f.read() == "1,2\n"
    assert not os.path.exists(os.path.expanduser("~/results.csv"))


def test_what_vanishes_is_reported_after_a_restart_and_in_the_log(workdir, state_dir):
    spec = write_spec("leftovers", [f"--Sandbox.state_dir={state_dir}", "--home=private"])
    log = os.path.join(workdir, "server.log")
    stderr = open(log, "w")     # the server's log, also for the restarted kernels
    k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
    try:
        k.execute("import os\nopen('/tmp/model.pkl', 'w').write('x'); os.mkdir('/dev/shm/cache')\n"
                  "open(os.path.expanduser('~/notes.txt'), 'w').write('y')\n"
                  "os.makedirs(os.path.expanduser('~/.cache/tool'))\n"
                  "for i in range(8): open(f'/var/tmp/part{i}', 'w').close()")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        out, error, _ = k.execute("print('first cell')")
        assert error is None
        notice = out.splitlines()[0]
        # (Once on CI the first kernel died of SIGABRT in its graceful shutdown, and the
        # notice said so first: the server log then shows what the kernel printed.)
        assert notice.startswith("ns-kernel: kernel ") and " left /tmp/model.pkl, " in notice, \
            (out, open(log).read())
        # five named, the rest counted; dot entries of the home (tools' caches) left out
        assert re.search(r"left /tmp/model\.pkl, /var/tmp/part\d, /var/tmp/part\d, "
                         r"/var/tmp/part\d, /var/tmp/part\d and 6 more, gone", notice), notice
        # The advice fits the kernel: its home goes with it too (--home private).
        assert notice.endswith("gone with its sandbox: keep files in the notebook's folder "
                               "($HOME goes with the kernel too: --home private); this is a "
                               "new kernel"), notice
        assert out.splitlines()[1] == "first cell"
        # Told once: a clean restart of a kernel that left nothing says nothing.
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        assert k.execute("print('second')")[0] == "second\n"
    finally:
        stop_kernel(k)
        stderr.close()
    with open(log) as f:
        text = f.read()
    assert text.count(" left /tmp/model.pkl, ") == 1, text
