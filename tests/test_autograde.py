"""nbgrader-style batch grading: `jupyter nbconvert --execute` runs each student's notebook
in an isolated kernel (installed by `ns-kernel install` with limits) from the student's own
folder. It cannot read another student's work nor the gradebook beside the students dir
(although their file modes would allow it), cannot reach the network (not even a listener
on the host's loopback), and is held by the memory limit."""
import os
import re
import socket
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import ATTEMPT, LIMITS_BACKEND


PROBES = "import os, socket\n" + ATTEMPT + """attempt("bob", lambda: open({bob!r}).read())
attempt("bob-relative", lambda: open("../bob/answers.txt").read())
attempt("gradebook", lambda: open({gradebook!r}, "rb").read())
attempt("host-loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=3))
attempt("internet", lambda: socket.create_connection(("192.0.2.1", 80), timeout=3))
print("students:", sorted(os.listdir("..")))
open("result.txt", "w").write("alice was here")
"""

HOG = """
import resource
limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
in_cgroup = {in_cgroup}    # (the kernel's cgroup is not visible inside: its own namespace)
print("limit in force:", limit == 512 << 20 or in_cgroup)
assert limit == 512 << 20 or in_cgroup, "no memory limit in force: not hogging"
try:
    x = bytearray(8 << 30)
except MemoryError:
    print("MemoryError")
"""


@pytest.fixture
def course(tmp_path):
    """course/gradebook.db and course/students/{alice,bob}, all world-readable."""
    root = tmp_path / "course"
    (root / "students" / "alice").mkdir(parents=True)
    (root / "students" / "bob").mkdir()
    (root / "gradebook.db").write_bytes(b"SQLite format 3\0 alice: 71, bob: 93")
    (root / "students" / "bob" / "answers.txt").write_text("42")
    for path in (tmp_path, root, root / "students"):
        path.chmod(0o755)
    # The students' folders are the grader's (root's, when root runs this): root's
    # sandbox (nobody) writes there through its folder's id map (--idmap-folder).
    return root


@pytest.fixture
def grader_spec(tmp_path):
    """The grader's kernelspec, named isolated-python, with limits."""
    prefix = tmp_path / "grader"
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "install", "--prefix", str(prefix),
                           "--home", "private", "--memory", "512M", "--pids", "64",
                           "--idmap-folder"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    os.chmod(tmp_path, 0o755)
    return str(prefix / "share" / "jupyter")


def execute(notebook, data_dir, out_dir):
    """nbconvert from a folder of the grader's, never the submission's, as docs/grading.md
    runs it (tests/test_nbgrader.py runs the recipe itself, as written)."""
    env = {**os.environ, "JUPYTER_PATH": data_dir}
    grader = os.path.join(os.path.dirname(str(out_dir)), "grader")
    os.makedirs(grader, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "notebook",
         "--ExecutePreprocessor.kernel_name=isolated-python",
         "--ExecutePreprocessor.timeout=60", "--output-dir", str(out_dir), str(notebook)],
        capture_output=True, text=True, timeout=180, env=env, cwd=grader)


def write_notebook(path, *sources):
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "isolated-python", "display_name": "Isolated Python",
                                 "language": "python"}
    nbformat.write(nb, str(path))


def outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))


def test_student_cannot_read_others_nor_reach_the_network(course, grader_spec, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    alice = course / "students" / "alice"
    write_notebook(alice / "hw.ipynb", PROBES.format(
        bob=str(course / "students" / "bob" / "answers.txt"),
        gradebook=str(course / "gradebook.db"), port=port))
    try:
        done = execute(alice / "hw.ipynb", grader_spec, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        text = outputs(tmp_path / "out" / "hw.ipynb")
        with pytest.raises(socket.timeout):
            listener.accept()     # nobody knocked
    finally:
        listener.close()
    results = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    assert results["bob"] == "FileNotFoundError"
    assert results["bob-relative"] == "FileNotFoundError"
    assert results["gradebook"] == "FileNotFoundError"
    assert results["host-loopback"] == "ConnectionRefusedError"
    assert results["internet"] == "OSError"           # ENETUNREACH: no route out
    assert results["students:"] == "['alice']"
    # Her own folder is hers to write (e.g. files the grader collects).
    assert (alice / "result.txt").read_text() == "alice was here"


def test_student_is_held_by_the_memory_limit(course, grader_spec, tmp_path):
    bob = course / "students" / "bob"
    write_notebook(bob / "hw.ipynb", HOG.format(in_cgroup=LIMITS_BACKEND != "rlimit"),
                   "print('survived')")
    done = execute(bob / "hw.ipynb", grader_spec, tmp_path / "out")
    # nbconvert's kernel has no id (a temporary connection file): the log names it by the
    # submission's folder, which tells the grader whose it was.
    assert re.search(rf"ns-kernel: kernel tmp\w+ in {re.escape(str(bob))} limits: memory 512M",
                     done.stderr), done.stderr
    if LIMITS_BACKEND == "rlimit":
        # The allocation fails inside the kernel; grading goes on.
        assert done.returncode == 0, done.stderr
        text = outputs(tmp_path / "out" / "hw.ipynb")
        assert "limit in force: True\nMemoryError\nsurvived" in text
    else:
        # The cgroup's OOM killer ends this kernel: nbconvert reports it; the host is fine.
        assert done.returncode != 0
        assert "DeadKernelError" in done.stderr or "Kernel died" in done.stderr
        assert "ns-kernel: kernel " in done.stderr and \
            "killed: out of memory (limit 512 MiB" in done.stderr


def test_a_student_leaves_no_link_for_the_grader_to_follow(course, grader_spec, tmp_path):
    # The student's code tries to leave nbconvert's default output name as a link to the
    # gradebook: the kernel may make no link in its folder, and the recipe writes its
    # output into the grader's own folder, which no kernel sees.
    alice = course / "students" / "alice"
    write_notebook(alice / "ps1.ipynb", "import os\n"
                   "try:\n"
                   "    os.symlink('../../gradebook.db', 'ps1.nbconvert.ipynb')\n"
                   "except OSError as exc:\n"
                   "    print('refused', type(exc).__name__)\n"
                   "print('done')")
    before = (course / "gradebook.db").read_bytes()
    done = execute(alice / "ps1.ipynb", grader_spec, tmp_path / "autograded")
    assert done.returncode == 0, done.stderr
    assert "refused PermissionError\ndone" in outputs(tmp_path / "autograded" / "ps1.ipynb")
    assert (course / "gradebook.db").read_bytes() == before
    assert not os.path.lexists(alice / "ps1.nbconvert.ipynb")


def test_nothing_one_submission_leaves_reaches_the_next(course, grader_spec, tmp_path):
    # Both run as the grader: an IPython startup file or an installed package left by one
    # kernel must not run in the next (--home private in the recipe).
    alice, bob = course / "students" / "alice", course / "students" / "bob"
    write_notebook(alice / "hw.ipynb", "import os, sys\n"
                   "d = os.path.expanduser('~/.ipython/profile_default/startup')\n"
                   "os.makedirs(d, exist_ok=True)\n"
                   "open(d + '/00-cheat.py', 'w').write('open(\"CHEATED\", \"w\")')\n"
                   "site = os.environ.get('PYTHONPATH', '').split(':')[0]\n"
                   "if site:\n"
                   "    open(site + '/json_helper.py', 'w').write('print(\"CHEATED\")')\n"
                   "print('planted', bool(site))")
    write_notebook(bob / "hw.ipynb", "import json_helper", "print('clean')")
    done = execute(alice / "hw.ipynb", grader_spec, tmp_path / "a")
    assert done.returncode == 0, done.stderr
    assert "planted True" in outputs(tmp_path / "a" / "hw.ipynb")
    done = execute(bob / "hw.ipynb", grader_spec, tmp_path / "b")
    assert not (bob / "CHEATED").exists()
    assert "ModuleNotFoundError" in done.stderr and "json_helper" in done.stderr


def test_recipe_imports_nothing_from_the_submission(course, grader_spec, tmp_path):
    # nbconvert puts its cwd first on sys.path: a module the student's code left in its
    # folder would run on the host, as the grader, at the next run from there.
    alice = course / "students" / "alice"
    marker = tmp_path / "ran-on-the-host"
    module = f"open({str(marker)!r}, 'w')\nexec(open('/usr/lib/python3.11/getopt.py').read())\n"
    write_notebook(alice / "ps1.ipynb",
                   f"import os\nopen('getopt.py', 'w').write({module!r})\nprint(os.getcwd())")
    for run in ("first", "second"):
        done = execute(alice / "ps1.ipynb", grader_spec, tmp_path / run)
        assert done.returncode == 0, done.stderr
        assert str(alice) in outputs(tmp_path / run / "ps1.ipynb")   # ran in its folder
    assert (alice / "getopt.py").exists()        # the attempt was made
    assert not marker.exists()
