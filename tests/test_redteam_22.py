"""Red team 22: what else on the host reads, runs or follows what a kernel can write.

Each test performs an attack that works on the main this branch was cut from and checks
that it fails. Where a host program has to run to show the harm (git, a Jupyter server's
lazy import), the test runs it and checks that the kernel's command never ran.

As root the sandbox runs as nobody: the folders and repositories here are made writable
by every uid (0777/0666), as a kernel of the user's own (same uid) finds them.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ATTEMPT, start_kernel, stop_kernel
from test_trust import PATHS, WITHOUT_LANDLOCK, attack, results, shared_folder

FSMONITOR = '[core]\\n\\tfsmonitor = touch {ran}\\n'


def open_up(path):
    """What the sandbox's uid may change, as the user's own kernel could (root's kernels
    run as nobody)."""
    for d, _, files in os.walk(path):
        os.chmod(d, 0o777)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666)


def git(*args, cwd):
    """git on the host, as the user runs it in a terminal or JupyterLab's git extension."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def run_in_kernel(path, folder, code):
    k = start_kernel(str(folder), kernel_name=PATHS[path])
    try:
        out, error, _ = k.execute(ATTEMPT + code)
    finally:
        stop_kernel(k)
    assert error is None, out
    return results(out), out


# -- git repositories the start-time scan does not see ------------------------------------

@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_repository_made_while_the_kernel_runs_is_read_only_once_it_restarts(tmp_path, path):
    # The repository search runs at each start: a project the user clones (or `git
    # init`s, or moves) into the notebook folder while a kernel runs there is writable by
    # that kernel until it restarts (docs/trust.md says so, and to restart it). After the
    # restart the kernel cannot plant core.fsmonitor or a hook for the user's next
    # `git status` on the host.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    k = start_kernel(str(folder), kernel_name=PATHS[path])
    try:
        subprocess.run(["git", "init", "-q", str(folder / "proj")], check=True)
        open_up(folder / "proj")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        out, error, _ = k.execute(ATTEMPT + f"""import os
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("config", lambda: write("proj/.git/config", "{FSMONITOR.format(ran=ran)}"))
attempt("hook", lambda: write("proj/.git/hooks/post-checkout", "#!/bin/sh\\ntouch {ran}\\n"))
""")
    finally:
        stop_kernel(k)
    assert error is None, out
    seen = results(out)
    git("status", cwd=folder / "proj")
    assert seen["config"] != "ALLOWED" and seen["hook"] != "ALLOWED", out
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_the_git_dir_a_dot_git_file_names_is_read_only(tmp_path, path):
    # Attack: the folder's .git is a file (`git init --separate-git-dir`, the bare repo +
    # worktrees layout, `gitdir: ./repo.git`): the scan binds that one file read-only,
    # not the git dir it names. That dir lies in the folder, writable: the kernel puts
    # core.fsmonitor in its config, and `git status` in the folder on the host runs it.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    subprocess.run(["git", "init", "-q", "--separate-git-dir", str(folder / "repo.git"),
                    str(folder)], check=True)
    open_up(folder / "repo.git")
    os.chmod(folder / ".git", 0o666)
    seen, out = attack(path, folder, f"""import os
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("gitfile", lambda: write(".git", "x"))
attempt("config", lambda: write("repo.git/config", "{FSMONITOR.format(ran=ran)}"))
attempt("hook", lambda: write("repo.git/hooks/post-checkout", "#!/bin/sh\\n"))
attempt("rename", lambda: os.rename("repo.git", "old.git"))
""")
    assert seen["gitfile"] == "OSError", out       # the .git file itself is held
    git("status", cwd=folder)
    for what in ("config", "hook", "rename"):
        assert seen[what] != "ALLOWED", (what, out)
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


@pytest.mark.parametrize("path", ["argv", "run"])
def test_a_repository_in_a_dot_dir_of_the_folder_is_read_only(tmp_path, path):
    # Attack: the scan skips dot dirs (right for a home, whose dot entries the kernel
    # never sees; not for a notebook folder, where they are shown read-write). A vendored
    # project in .vendor/lib, a tool's checkout in .deps/, a `pip install -e git+...`
    # clone in .venv/src/: the kernel writes its config, git on the host runs it.
    folder = shared_folder(tmp_path, ".vendor/lib")
    ran = tmp_path / "ran"
    subprocess.run(["git", "init", "-q", str(folder / ".vendor" / "lib")], check=True)
    open_up(folder / ".vendor")
    seen, out = attack(path, folder, f"""
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("config", lambda: write(".vendor/lib/.git/config", "{FSMONITOR.format(ran=ran)}"))
""")
    git("status", cwd=folder / ".vendor" / "lib")
    assert seen["config"] != "ALLOWED", out
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


# -- Linux without Landlock ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["argv", "run"])
def test_without_landlock_a_kernel_makes_no_fifo_in_the_folder(tmp_path, path):
    # docs/trust.md: a kernel that tries mkfifo in the notebook folder gets "Permission
    # denied" ("a FIFO hangs whoever opens it": the Jupyter server's contents API opening
    # notes.ipynb, a checkpoint, git add). Without Landlock the seccomp filter stands in
    # for it, but denies only symlink/symlinkat: mknod(S_IFIFO) passes.
    folder = shared_folder(tmp_path)
    # A template of its own, started without Landlock (a short path: its socket's).
    runtime = tempfile.mkdtemp(prefix="rt22-")
    code = ATTEMPT + """import os
attempt("mkfifo", lambda: os.mkfifo("notes.ipynb"))
attempt("mknod", lambda: os.mknod("data.csv", 0o10644))
attempt("file", lambda: open("notes.txt", "w").close())
"""
    try:
        done = subprocess.run([sys.executable, "-c", WITHOUT_LANDLOCK, PATHS.get(path, path),
                               str(folder), code], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "XDG_RUNTIME_DIR": runtime})
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    seen = results(done.stdout)
    assert seen["file"] == "ALLOWED", done.stdout
    assert seen["mkfifo"] == seen["mknod"] == "PermissionError", done.stdout
    assert sorted(os.listdir(folder)) == ["notes.txt"]


# -- the Jupyter server's own import path ---------------------------------------------------

# A Jupyter server started as `python -m jupyterlab` (or `python -m jupyter_server`) in
# the notebook folder: Python puts that folder first on the server's sys.path. The
# provisioner runs in the server's process; the server imports nbconvert only when the
# user first exports a notebook (File > Save and Export As, jupyter_server/nbconvert/
# handlers.py: `from nbconvert.exporters.base import get_exporter`).
SERVER = """import os, sys
sys.path.insert(0, os.getcwd())     # what `python -m jupyterlab` run here has first
name, code = sys.argv[1:]
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=name)
try:
    km.start_kernel(cwd=os.getcwd())
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
except Exception as exc:
    print("REFUSED", exc)
    km.shutdown_kernel(now=True)
    sys.exit(0)
try:
    def show(msg):
        if msg["msg_type"] == "stream":
            print(msg["content"]["text"], end="")
    kc.execute_interactive(code, timeout=30, output_hook=show)
finally:
    kc.stop_channels()
    km.shutdown_kernel()
try:
    from nbconvert.exporters.base import get_exporter    # the user exports a notebook
except Exception:
    pass
"""


@pytest.mark.parametrize("path", ["provisioner"])
def test_a_server_whose_import_path_holds_the_folder_starts_no_kernel_there(tmp_path, path):
    # Attack: the kernel writes nbconvert/__init__.py into its folder; the server, whose
    # sys.path starts with that folder, imports it at the user's first export, on the
    # host. The launcher refuses the folder on its own sys.path or PYTHONPATH; the
    # provisioner, in the server's process, never looks at the server's.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    code = ATTEMPT + f"""import os
def plant():
    os.makedirs("nbconvert", exist_ok=True)
    with open("nbconvert/__init__.py", "w") as f:
        f.write("open({str(ran)!r}, 'w').close()\\n")
attempt("plant", plant)
"""
    done = subprocess.run([sys.executable, "-c", SERVER, PATHS[path], code], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not ran.exists(), ("the server imported the kernel's nbconvert/__init__.py",
                              done.stdout)


# -- not an attack: what the Landlock ruleset costs a notebook ------------------------------

@pytest.mark.parametrize("path", ["argv", "run"])
def test_a_kernel_moves_its_own_files_between_folders(tmp_path, path):
    # Not a way out, a regression the Landlock ruleset brought: Landlock denies every
    # link or rename into another directory (LANDLOCK_ACCESS_FS_REFER is "denied by
    # default by any ruleset, even if not handled"), so os.rename("a", "sub/a"),
    # Path.rename, os.replace of a temp file made in another dir of the folder or in
    # /tmp's own subdirs, fail with EXDEV, where a plain kernel moves the file.
    folder = shared_folder(tmp_path, "results")
    seen, out = attack(path, folder, """import os
open("run.csv", "w").close()
attempt("folder", lambda: os.rename("run.csv", "results/run.csv"))
os.makedirs("/tmp/work/out")
open("/tmp/work/t", "w").close()
attempt("tmp", lambda: os.replace("/tmp/work/t", "/tmp/work/out/t"))
""")
    assert seen == {"folder": "ALLOWED", "tmp": "ALLOWED"}, out
