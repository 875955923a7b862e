"""The README and docs/ as a newcomer follows them: every `sh` block runs as written, in
document order, from a copy of this checkout, with a home of its own and a fresh venv made
from Debian's python3 and activated (scripts/ get a venv path of their own to make, through
NS_KERNEL_VENV, as they would make /opt/ns-kernel/venv). A `jupyter lab` must serve
Isolated Python; it is then stopped.

Not run here: the blocks ELSEWHERE names, and what runs them instead; the documents
ELSEWHERE_DOCS names, and what runs them instead."""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import stop_templates
from ns_kernel import limits

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
DOCUMENTS = ["README.md", *sorted(f"docs/{n}" for n in os.listdir(f"{REPO}/docs")
                                  if n.endswith(".md"))]
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.S | re.M)
LAB_URL = re.compile(r"(http://(?:localhost|127\.0\.0\.1):\d+)/lab\?token=(\w+)")
# What the machine's pip and proxies need (its index, mirrors, certificates).
PASSED_ON = re.compile(r"PIP_.*|(?i:https?_proxy|no_proxy)|SSL_CERT_.*")
# A block's first word: what runs it instead.
ELSEWHERE = {"scripts/test": "this very run (.ci/run)",
             "podman": "tests/test_containers.py, on its own image (scripts/test-containers)",
             "docker": "tests/test_docker_hub.py, on Debian's Docker (scripts/test-containers)"}
ELSEWHERE_DOCS = {"docs/grading.md": "tests/test_nbgrader.py, with nbgrader, as root and as "
                                     "an ordinary user"}
# The output a block quotes as `# ns-kernel: ...` comments.
QUOTED = re.compile(r"^# (ns-kernel: .*)$", re.M)


def blocks():
    """(document:line, text) of every sh block, in reading order."""
    for name in DOCUMENTS:
        with open(f"{REPO}/{name}") as f:
            text = f.read()
        for m in BLOCK.finditer(text):
            yield f"{name}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1)


@pytest.fixture
def newcomer():
    """A clone, a home and a fresh venv in one dir readable by every uid (root's sandbox
    runs as nobody, and must run the venv's python); removed at the end."""
    top = tempfile.mkdtemp(prefix="ns-kernel-readme-")
    os.chmod(top, 0o755)
    clone = f"{top}/clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".pytest_cache", "__pycache__", "*.egg-info", "build", "results"))
    home = f"{top}/home"
    os.makedirs(f"{home}/.jupyter")
    # A machine without a browser; Jupyter serves root only when told.
    with open(f"{home}/.jupyter/jupyter_server_config.json", "w") as f:
        json.dump({"ServerApp": {"open_browser": False, "allow_root": os.getuid() == 0}}, f)
    venv = f"{top}/venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
    env = {k: v for k, v in os.environ.items() if PASSED_ON.fullmatch(k)}
    env.update(PATH=f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", VIRTUAL_ENV=venv, HOME=home,
               LANG="C.UTF-8", NS_KERNEL_VENV=f"{top}/scripts-venv",
               PIP_CACHE_DIR=f"{top}/pip-cache")
    yield {"top": top, "clone": clone, "env": env, "venv": venv}
    # The templates of its venvs' kernels: scripts/test runs this test in a session of its
    # own, which does not stop those in the default base (the other session's are there).
    stop_templates(under=top, environ=env)
    shutil.rmtree(top, ignore_errors=True)


def serving(url, token, timeout=60):
    """The kernelspecs a Jupyter server at url offers: {name: display name}. (It prints
    its URL before its loop runs the callback that binds the port.)"""
    req = urllib.request.Request(f"{url}/api/kernelspecs",
                                 headers={"Authorization": f"token {token}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                specs = json.load(resp)["kernelspecs"]
            return {name: spec["spec"]["display_name"] for name, spec in specs.items()}
        except urllib.error.URLError as exc:
            if (not isinstance(exc.reason, ConnectionRefusedError)
                    or time.monotonic() > deadline):
                raise
            time.sleep(0.2)


def run_block(where, text, newcomer):
    """Run text with `bash -e` (a failing line stops it, as it would stop a person); what
    it printed and its status. A `jupyter lab` in it must serve Isolated Python, and is
    stopped then."""
    proc = subprocess.Popen(["bash", "-e", "-c", text], cwd=newcomer["clone"],
                            env=newcomer["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            lab = LAB_URL.search(line)
            if lab:
                try:
                    specs = serving(*lab.groups())
                except OSError as exc:
                    raise AssertionError(f"{where}: {exc}:\n{''.join(out)}") from None
                assert specs.get("isolated-python") == "Isolated Python", (where, specs)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                return "".join(out), 0
        return "".join(out), proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


@pytest.mark.timeout(1800)
def test_every_sh_block_runs_as_written(newcomer):
    ran = []
    for where, text in blocks():
        if text.split()[0] in ELSEWHERE or where.split(":")[0] in ELSEWHERE_DOCS:
            continue
        out, status = run_block(where, text, newcomer)
        quoted = QUOTED.findall(text)
        if any("killed" in q for q in quoted):
            # It shows a kernel being killed: the launcher's words, where this caller's
            # limits backend is the one the docs quote.
            assert status != 0, (where, out)
            backend = limits.first_usable(limits.probe())[0]
            if f"(by {backend})" in quoted[0]:
                for line in quoted:
                    assert line in out, (where, line, out)
        else:
            assert status == 0, f"{where} failed ({status}):\n{text}\n{out}"
        ran.append((where, text, out))
    seen = {text.split()[0]: out for _, text, out in ran}
    # The demo ends with what to do next, and prints no warning a user must learn to ignore.
    demo, _, lab = seen["scripts/demo"].partition("\n  scripts/lab\n")
    assert lab and "===== side by side =====" in demo, demo
    assert not re.search(r"(?i)warning|traceback", demo), demo
    # `pip install .` and JupyterLab bring every command the README names.
    for command in ("ns-kernel", "jupyter-lab", "jupyter-nbconvert", "jupyter-kernelspec"):
        assert os.access(f"{newcomer['venv']}/bin/{command}", os.X_OK), command
