"""nbgrader itself, as an instructor runs it: a course made with nbgrader's own commands,
an assignment with an autograded answer and hidden tests, and three submissions: alice's,
right; walt's, wrong; eve's, hostile inside the kernel (the gradebook, the other students,
the network, a setuid copy of a shell, its memory and process limits) and towards nbgrader's handling
of the folder it leaves (read-only and unreadable folders, folders a thousand deep, a
timestamp from the future, links). They are graded as an instructor grades again, over
what an earlier round's kernels left in their folders, with docs/grading.md's blocks run
as written (its /srv/ is a temp dir here), as whoever runs the suite: root, and the
ordinary user of scripts/test's second pass. Whoever grades, and whatever eve's code
does, alice gets full marks, walt none, and the gradebook and the course stay as they
were."""
import csv
import os
import re
import sqlite3
import stat
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```$", re.S | re.M)
STUDENTS = ("alice", "eve", "walt")     # nbgrader's order: eve's run comes before walt's


def recipe():
    """docs/grading.md's code blocks, in order: [(language, text)]."""
    with open(f"{REPO}/docs/grading.md") as f:
        return BLOCK.findall(f.read())


def block(first_words):
    """The recipe's one block that starts with first_words."""
    found = [text for _, text in recipe() if text.startswith(first_words)]
    assert len(found) == 1, (first_words, found)
    return found[0]


def nbgrader_cell(cell, grade_id, **kind):
    cell.metadata["nbgrader"] = {"grade_id": grade_id, "schema_version": 3, "task": False,
                                 "grade": False, "solution": False, "locked": False, **kind}
    return cell


# The instructor's notebook: two answers, each with a test; the first test has hidden
# parts, the second needs the answer to write a file in the notebook's folder.
SOURCE = [
    new_markdown_cell("Squares, and a file of them."),
    nbgrader_cell(new_code_cell("def squares(n):\n    ### BEGIN SOLUTION\n"
                                "    return [i * i for i in range(1, n + 1)]\n"
                                "    ### END SOLUTION"), "squares", solution=True),
    nbgrader_cell(new_code_cell("assert squares(3) == [1, 4, 9]\n### BEGIN HIDDEN TESTS\n"
                                "assert squares(5)[-1] == 25\n### END HIDDEN TESTS"),
                  "test_squares", grade=True, locked=True, points=2),
    nbgrader_cell(new_code_cell("def save(values):\n    ### BEGIN SOLUTION\n"
                                "    with open('results.txt', 'w') as f:\n"
                                "        f.write(','.join(map(str, values)))\n"
                                "    ### END SOLUTION"), "save", solution=True),
    nbgrader_cell(new_code_cell("save(squares(3))\n"
                                "assert open('results.txt').read() == '1,4,9'"),
                  "test_save", grade=True, locked=True, points=1),
]

ALICE = {"squares": "def squares(n):\n    return [i * i for i in range(1, n + 1)]",
         "save": "def save(values):\n    with open('results.txt', 'w') as f:\n"
                 "        f.write(','.join(map(str, values)))"}
WALT = {"squares": "def squares(n):\n    return list(range(n))",
        "save": "def save(values):\n    pass"}
EVE = {"squares": r'''
import os, socket, subprocess
def attempt(what, action):
    try:
        action()
        outcome = "done"
    except Exception as exc:
        outcome = type(exc).__name__
    # On the kernel's own stderr: the launcher copies it to nbgrader's, which the test
    # reads (nbgrader removes her graded notebook when its walk of her folder fails).
    os.write(2, f"eve: {what} {outcome}\n".encode())
# Inside: the gradebook, the course, the other students, the network, a root shell.
attempt("gradebook", lambda: open("../../../gradebook.db", "rb").read())
attempt("config", lambda: open("../../../nbgrader_config.py").read())
attempt("alice", lambda: os.listdir("../../alice"))
attempt("loopback", lambda: socket.create_connection(("127.0.0.1", 22), timeout=2))
attempt("setuid", lambda: (open("sh", "wb").write(open("/bin/sh", "rb").read()),
                           os.chmod("sh", 0o4755)))
attempt("setuid-open", lambda: os.close(os.open("sh2", os.O_CREAT | os.O_WRONLY, 0o6755)))
# nbgrader writes the graded notebook here, then chmods it: through a link, onto the
# gradebook; a hard link of a file outside.
attempt("symlink", lambda: (os.rename("ps1.ipynb", "ps1.orig"),
                            os.symlink("../../../gradebook.db", "ps1.ipynb")))
if not os.path.exists("ps1.ipynb"):
    os.rename("ps1.orig", "ps1.ipynb")
attempt("hardlink", lambda: os.link("/etc/passwd", "passwd"))
# More than its memory limit, at once.
attempt("memory", lambda: bytearray(1 << 30))
# Its process limit, reached; a process meant to outlive grading.
kids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            import time
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError:
    os.write(2, f"eve: forks refused after {len(kids)}\n".encode())
for pid in kids:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
subprocess.Popen(["sleep", "7213"], start_new_session=True)
# What nbgrader (and a grader's rm) must get past: folders the grader may not write or
# read, a thousand deep, and a timestamp that would make the next run skip this student.
os.makedirs("locked/inner")
open("locked/inner/answers", "w").close()
os.chmod("locked/inner", 0o555)
os.chmod("locked", 0o555)
os.mkdir("closed")
open("closed/answers", "w").close()
os.chmod("closed", 0)
top = os.open(".", os.O_RDONLY)
for _ in range(1100):
    os.mkdir("d")
    os.chdir("d")
os.fchdir(top)
open("timestamp.txt", "w").write("2999-01-01 00:00:00.000000 UTC")
os.chmod(".", 0o555)
def squares(n):
    return [1, 4, 9]
''', "save": "def save(values):\n    open('results.txt', 'w').write('1,4,9')"}


def submission(release, answers):
    """The released notebook with the student's answers in its solution cells."""
    nb = nbformat.read(release, as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = answers[meta["grade_id"]]
    return nb


LEAVE = """
mkdir -p locked/inner closed && touch locked/inner/answers closed/answers
chmod 555 locked/inner locked && chmod 000 closed
python3 -c 'import os
for _ in range(1100):
    os.mkdir("d")
    os.chdir("d")'
chmod 555 .
"""


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """/srv as the recipe has it: the course (made with nbgrader quickstart's layout and
    nbgrader's commands: generate_assignment made the release and the gradebook) with
    the three submissions, and the grader's kernelspec the recipe installs. The shell of
    the recipe's blocks: this venv's commands first on PATH, as an activated venv has."""
    srv = tmp_path_factory.mktemp("srv")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    course = srv / "course"
    (course / "source" / "ps1").mkdir(parents=True)
    config = [text for lang, text in recipe() if lang == "python"]
    assert len(config) == 1, config
    (course / "nbgrader_config.py").write_text(
        'c = get_config()\nc.CourseDirectory.course_id = "course"\n' + config[0])
    nb = new_notebook(cells=SOURCE)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(course / "source" / "ps1" / "ps1.ipynb"))
    done = subprocess.run(["nbgrader", "generate_assignment", "ps1"], cwd=course, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    release = course / "release" / "ps1" / "ps1.ipynb"
    for name, answers in zip(STUDENTS, (ALICE, EVE, WALT)):
        folder = course / "submitted" / name / "ps1"
        folder.mkdir(parents=True)
        nbformat.write(submission(release, answers), str(folder / "ps1.ipynb"))
        (folder / "timestamp.txt").write_text("2026-01-01 12:00:00.000000 UTC")
    # What an earlier round's kernels left where nbgrader grades them, as eve's leaves it
    # below: folders no rmtree of the grader's gets through (as an ordinary user: modes;
    # as anyone: depth), and timestamps that would make nbgrader skip the student.
    for name in ("alice", "eve"):
        (course / "autograded" / name / "ps1").mkdir(parents=True)
        (course / "autograded" / name / "ps1" / "timestamp.txt").write_text(
            "2999-01-01 00:00:00.000000 UTC")
    subprocess.run(["bash", "-e", "-c", LEAVE], cwd=course / "autograded" / "eve" / "ps1",
                   check=True)
    run(block("ns-kernel install"), srv, env)
    yield {"srv": srv, "env": env, "course": course,
           "kept": {name: (course / name).read_bytes()
                    for name in ("gradebook.db", "nbgrader_config.py")}}
    # As the recipe removes what a kernel left: Python's rmtree recurses, once per level.
    subprocess.run(["chmod", "-R", "u+rwX", str(srv)], check=True)
    subprocess.run(["rm", "-rf", str(srv)], check=True)


def run(text, srv, env):
    """A block as written (bash -e, as a person's shell stops at a failing line), its
    /srv/ the test's; what it printed."""
    done = subprocess.run(["bash", "-e", "-c", text.replace("/srv/", f"{srv}/")], cwd=srv,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{text}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def grades(course):
    with open(course / "grades.csv") as f:
        return {row["student_id"]: (float(row["score"]), float(row["max_score"]))
                for row in csv.DictReader(f)}


def check_no_harm(course, kept, said):
    """The gradebook and the course's config are as nbgrader left them, and nothing eve
    made is setuid; nothing she started outlives grading."""
    db = course / "gradebook.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o644
    assert sqlite3.connect(db).execute("pragma integrity_check").fetchone() == ("ok",)
    assert (course / "nbgrader_config.py").read_bytes() == kept["nbgrader_config.py"]
    found = subprocess.run(["find", str(course), "-perm", "/6000"], capture_output=True,
                           text=True)
    assert found.stdout == "", found.stdout
    kernel_uid = 65534 if os.getuid() == 0 else os.getuid()
    left = subprocess.run(["pgrep", "-u", str(kernel_uid), "-f", "sleep 7213"],
                          capture_output=True, text=True)
    assert left.stdout == "", left.stdout
    # Its kernel stopped by nbgrader after reaching its process limit: not "killed".
    assert "killed" not in said, said


@pytest.mark.timeout(600)
def test_the_recipe_grades_each_submission_whoever_grades(course):
    said = run(block("cd /srv/course\nexport"), course["srv"], course["env"])
    # Past eve's run (and what an earlier round left: alice's timestamp too), each graded.
    assert grades(course["course"])["alice"] == (3.0, 3.0), said
    assert grades(course["course"])["walt"] == (0.0, 3.0), said
    # alice's answer wrote its file in the folder nbgrader made, which is root's when
    # root grades: the kernel (nobody) writes it as root's, as a user's kernel as theirs.
    written = course["course"] / "autograded" / "alice" / "ps1" / "results.txt"
    assert written.read_text() == "1,4,9"
    assert written.stat().st_uid == os.getuid()
    # The kernels ran in the folders nbgrader made, and the log names them so.
    assert f"in {course['course']}/autograded/eve/ps1 limits: memory 512M per process" in said
    for probe, outcome in (("gradebook", "FileNotFoundError"), ("config", "FileNotFoundError"),
                           ("alice", "FileNotFoundError"), ("loopback", "ConnectionRefusedError"),
                           ("setuid", "PermissionError"), ("setuid-open", "PermissionError"),
                           ("symlink", "PermissionError"), ("hardlink", "OSError"),
                           # The same limit whoever grades (the recipe's --limits rlimit):
                           # the cell fails, the kernel lives on to be graded.
                           ("memory", "MemoryError")):
        assert f"eve: {probe} {outcome}" in said, said
    assert "eve: forks refused after" in said, said
    # What eve's kernel left there now (nbgrader got through none of it) is the next
    # round's to remove, as the recipe removed the earlier round's.
    assert os.path.isdir(course["course"] / "autograded" / "eve" / "ps1" / "d")
    check_no_harm(course["course"], course["kept"], said)


@pytest.mark.timeout(300)
def test_nbconvert_recipe_runs_a_copy_of_the_submission(course):
    submitted = course["course"] / "submitted" / "alice" / "ps1"
    before = {p.name: p.read_bytes() for p in submitted.iterdir()}
    run(block("cd /srv/course\nif"), course["srv"], course["env"])
    graded = course["course"] / "autograded" / "alice" / "ps1"
    nb = nbformat.read(graded / "ps1.ipynb", 4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert [o for o in outputs if o["output_type"] == "error"] == [], outputs
    assert (graded / "results.txt").read_text() == "1,4,9"
    # The submission itself is as the student handed it in.
    assert {p.name: p.read_bytes() for p in submitted.iterdir()} == before
