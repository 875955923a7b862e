"""Warm start (the default): kernels forked from a per-user template, with the same isolation
as a cold start (test_isolation.py runs every probe on warm kernels too) and nothing
carried from one kernel to the next."""
import errno
import gc
import json
import os
import pathlib
import pickle
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager

from conftest import COMMAND_LINE, KERNEL_NAME, LIMITS_BACKEND, LOOPBACK, STARTED, alive, \
    descendants, in_pid_namespace, interrupt_busy_loop, kernel_cgroups, kernel_host_pid, kernel_in_pid_namespace, parent_pid, \
    process_state, start_kernel, start_paths, stop_kernel, stop_templates, wait_until, write_spec
from ns_kernel import cgroup, warm

WARM = KERNEL_NAME       # warm is the default


def gone(pid, timeout=10):
    """The process has exited (a daemonized template's zombie may wait for PID 1 to reap
    it, which on these VMs takes its time)."""
    return wait_until(lambda: not alive([pid]), timeout=timeout)


@pytest.fixture(scope="module")
def workdir_module():
    wd = tempfile.mkdtemp(prefix="ns-kernel-warm-")
    os.chmod(wd, 0o777)
    yield wd
    # The template outlives kernels by design; the tests leave nothing running.
    pid = warm.template_pid()
    warm.stop()
    assert pid is None or gone(pid), process_state(pid)
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
        assert k.value(STARTED) == "warm"
        # Its command line is its own argv, as an exec'd kernel's is: nothing of the
        # template's (whose socket is a host path).
        words = k.value(COMMAND_LINE)
        assert words[:5] == [sys.executable.encode(), b"-m", b"ipykernel_launcher", b"-f",
                             b"/run/ns-kernel/connection.json"], words
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


PROVISIONED = write_spec("warm-provisioner", provisioner=True)


def command_line(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_the_provisioner_starts_no_client(user_base, workdir_module):
    # With the template listening, the provisioner (in the Jupyter server: here, this
    # process) asks it for the launcher itself: no client interpreter for the kernel.
    first = start_kernel(workdir_module, kernel_name=WARM)    # the template runs
    template = warm.template_pid()
    k = start_kernel(workdir_module, kernel_name=PROVISIONED)
    try:
        launcher = k.km.provisioner.process
        assert isinstance(launcher, warm.Launcher)
        assert not [pid for pid in descendants(os.getpid()) if k.km.connection_file.encode()
                    in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
        # Once the kernel runs, its launcher hands it to the sandbox's monitor and leaves:
        # on the host the kernel keeps its monitor, the template's child, and init.
        assert gone(launcher.pid)
        monitor = parent_pid(parent_pid(kernel_host_pid(k)))
        assert parent_pid(monitor) == template
        assert len(descendants(monitor)) == 2       # init, the kernel
        # What `ps` says of each (titles.py): the kernel by the name its hostname has.
        name = k.value("__import__('socket').gethostname()").rsplit("-", 1)[1]
        assert command_line(template) == f"ns-kernel-template {sys.executable}"
        assert command_line(monitor) == f"ns-kernel-monitor {name}"
        assert command_line(parent_pid(kernel_host_pid(k))) == "ns-kernel-init"
        assert command_line(kernel_host_pid(k)).startswith(
            f"{sys.executable} -m ipykernel_launcher -f /run/ns-kernel/connection.json")
        spares = {"ns-kernel-template spare launcher", "ns-kernel-template spare monitor"}
        assert wait_until(lambda: spares <= {command_line(p) for p in descendants(template)
                                             if parent_pid(p) == template})
        # Out of the kernel's cgroup: its work is not the kernel's to pay for (nor its to
        # be OOM-killed for), and it removes that cgroup at the end.
        with open(f"/proc/{monitor}/cgroup") as f:
            assert "/ns-kernel-" not in f.read()
        with open(f"/proc/{kernel_host_pid(k)}/cgroup") as f:
            assert ("/ns-kernel-" in f.read()) == (LIMITS_BACKEND != "rlimit")
        # What the server does to a kernel through it: interrupt, restart, its exit status.
        interrupt_busy_loop(k)
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=30)
        assert isinstance(k.km.provisioner.process, warm.Launcher)
        assert k.value("__import__('os').getpid()") == 2
        k.kc.execute("import os; os._exit(3)")
        assert wait_until(lambda: not k.km.is_alive(), timeout=20)
        assert k.km.provisioner.process.wait(timeout=5) == 3
    finally:
        stop_kernel(k)
        stop_kernel(first)


# A Jupyter server of its own, so that it can die: starts a kernel through the provisioner,
# says what it got and the kernel's pid namespace, and waits.
SERVER = """
import sys, time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel(cwd=sys.argv[2])
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
seen = []
kc.execute_interactive("print(__import__('os').readlink('/proc/self/ns/pid'))", timeout=30,
                       output_hook=lambda m: seen.append(m["content"].get("text", "")))
print(type(km.provisioner.process).__name__, km.provisioner.pid,
      km.provisioner.kernel_socket_dir, "".join(seen).strip(), flush=True)
time.sleep(300)
"""


def test_a_provisioned_kernel_goes_with_its_server(user_base, workdir_module):
    first = start_kernel(workdir_module, kernel_name=WARM)    # the template runs
    server = subprocess.Popen([sys.executable, "-c", SERVER, PROVISIONED, workdir_module],
                              stdout=subprocess.PIPE, text=True)
    try:
        kind, launcher, box, ns = server.stdout.readline().split()
        assert kind == "Launcher" and os.path.isdir(box)
        # The kernel (init too, where the host side may read its ns: as root).
        assert in_pid_namespace(ns)
        server.kill()
        server.wait()
        assert gone(int(launcher))
        assert wait_until(lambda: not in_pid_namespace(ns) and not os.path.lexists(box),
                          timeout=10)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        stop_kernel(first)


@pytest.mark.parametrize("spec", [WARM, PROVISIONED])
def test_a_kill_in_a_kernels_first_moments_leaves_nothing(user_base, workdir_module, spec):
    # Jupyter kills a kernel it has only just started (a restart or a shutdown, now): a
    # launcher that had made the kernel's cgroup and socket dir before its monitor held
    # them removes them itself, whenever the kill comes.
    from jupyter_client.manager import KernelManager
    from ns_kernel.launcher import kernel_id_from
    base, _ = user_base
    first = start_kernel(workdir_module, kernel_name=WARM)    # the template runs
    before = set(os.listdir(base))      # the template's socket and lock, first's dir
    left = []
    try:
        for delay in (0, 0.02, 0.05, 0.1, 0.2, 0.5):
            km = KernelManager(kernel_name=spec)
            km.start_kernel(cwd=workdir_module)
            time.sleep(delay)
            km.shutdown_kernel(now=True)
            kid = kernel_id_from(km.connection_file)
            if not wait_until(lambda: set(os.listdir(base)) == before
                              and not kernel_cgroups(kid), timeout=10):
                left.append((delay, set(os.listdir(base)) - before, kernel_cgroups(kid)))
    finally:
        stop_kernel(first)
    assert not left, left


def test_stop_without_template_says_so(monkeypatch):
    # Another startup environment is another template, and none runs for it.
    monkeypatch.setenv("LANG", "C.UTF-8-no-template-for-this")
    assert warm.stop() is False


# -- who may talk to whom (warm.py: untrusted, KINDS) ---------------------------------

OTHER_UID = 12345
ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="needs a second uid: root makes one")

# A "template" of another uid, at the warm template's path: it binds as root (who may
# write the base), then listens as OTHER_UID, which is what a client's SO_PEERCRED shows.
# One JSON line per connection: what the client sent it.
FAKE_TEMPLATE = r"""
import json, os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.bind(path)
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
sock.listen(8)
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    conn.settimeout(10)
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
    except OSError:
        data, fds = b"", []
    print(json.dumps({"bytes": len(data), "fds": len(fds)}), flush=True)
    conn.close()
"""


@ROOT_ONLY
@pytest.mark.parametrize("base_owner", ["ours", "theirs"])
@pytest.mark.parametrize("spec", [WARM, PROVISIONED])
def test_client_hands_nothing_to_a_template_of_another_uid(user_base, workdir, tmp_path,
                                                           base_owner, spec):
    # Another user's process listens where our template would: in our own base (SO_PEERCRED
    # says it is not ours), or in a base that user made first (not even a connect). Neither
    # the client nor the provisioner (which asks a template itself) sends it anything, not
    # the server's environment nor its stdio, and the kernel starts cold.
    base, _ = user_base
    os.mkdir(base, 0o700)
    if base_owner == "theirs":
        os.chown(base, OTHER_UID, OTHER_UID)
    fake = subprocess.Popen([sys.executable, "-c", FAKE_TEMPLATE, warm.socket_path(),
                             str(OTHER_UID)], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline() == "listening\n"
        with open(tmp_path / "log", "w") as log:     # the launcher has its own copy
            k = start_kernel(workdir, kernel_name=spec, stderr=log)
        try:
            assert k.value("__import__('os').getpid()") == 2
            assert k.value(STARTED) != "warm"      # a cold kernel
        finally:
            stop_kernel(k)
    finally:
        fake.kill()
    got = [json.loads(line) for line in fake.communicate()[0].splitlines()]
    assert all(seen == {"bytes": 0, "fds": 0} for seen in got), got
    if base_owner == "theirs":
        assert got == []
    lines = [line for line in (tmp_path / "log").read_text().splitlines()
             if line.startswith("ns-kernel: warm start")]
    assert len(lines) == 1 and lines[0].endswith("; this kernel starts cold"), lines
    assert (f"is owned by uid {OTHER_UID}" if base_owner == "theirs"
            else f"the peer is uid {OTHER_UID}") in lines[0], lines[0]


@pytest.fixture
def template(user_base):
    """A real template of ours, in the test's own base; stopped at the end."""
    warm.connect_or_start().close()
    pid = warm.template_pid()
    yield pid
    warm.stop()     # unless the test stopped it
    assert gone(pid), process_state(pid)


def ask(sock, data, fds=()):
    """Send one request; what comes back before the template closes the connection."""
    try:
        socket.send_fds(sock, [data], list(fds))
        return sock.recv(64)
    except (BrokenPipeError, ConnectionResetError):
        return b""
    finally:
        sock.close()


def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(warm.socket_path())
    return sock


@pytest.mark.parametrize("end", ["stop", "SIGKILL"])
def test_the_pair_a_template_keeps_forked_goes_with_it(user_base, end):
    # The two processes the next request needs are forked before it comes; they must not
    # outlive the template, however it ends.
    warm.connect_or_start().close()
    pid = warm.template_pid()
    # Each connection above took a pair, which leaves once it has read nothing: wait for
    # the one forked after them, the same two processes 0.3 s apart.
    seen = []

    def settled():
        seen.append(sorted(alive(descendants(pid))))
        time.sleep(0.3)     # the same two, still: no event marks the last pair forked
        return len(seen[-1]) == 2 and sorted(alive(descendants(pid))) == seen[-1]
    assert wait_until(settled), seen
    waiting = seen[-1]
    if end == "stop":
        assert warm.stop()
    else:
        os.kill(pid, signal.SIGKILL)
    assert gone(pid), process_state(pid)
    for child in waiting:
        assert gone(child), process_state(child)


def test_template_takes_plain_requests_of_known_kinds_only(template, workdir):
    marker = os.path.join(workdir, "ran")
    stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    env = dict(os.environ)
    try:
        for data, fds in (
                (pickle.dumps({"kind": "stop"}), ()),                       # not data
                (json.dumps({"kind": "shell", "argv": ["/bin/true"]}).encode(), ()),
                (json.dumps({"kind": "stop", "and": "more"}).encode(), ()),
                (json.dumps(["stop"]).encode(), ()),
                # A kernel's request whose argv is not a kernel start: `ns-kernel run`.
                (json.dumps({"kind": "kernel", "argv": ["run", "--", "/bin/touch", marker],
                             "env": env, "cwd": workdir}).encode(), stdio),
                (json.dumps({"kind": "kernel", "argv": ["-f", "x.json"], "env": env,
                             "cwd": workdir}).encode(), ()),               # without its stdio
        ):
            assert ask(connect(), data, fds) == b"", data
        # A negative (nothing started): no event says a thing will not happen; the positive
        # case below takes milliseconds.
        time.sleep(1)    # what a request started would have done by now
        assert alive([template]) and warm.template_pid() == template
        assert not os.path.exists(marker)
    finally:
        for fd in stdio:
            os.close(fd)
    # The same channel works for a request of a known kind (so the above could fail).
    assert ask(connect(), json.dumps({"kind": "stop"}).encode()) == b""
    assert gone(template), process_state(template)


def test_template_refuses_a_client_inside_a_sandbox(template):
    # A kernel has its user's uid (an ordinary user's kernels): what tells it apart is
    # its user namespace. A process in a fresh one asks the template to stop.
    from ns_kernel.syscalls import CloneFlags, unshare
    ready_r, ready_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            unshare(CloneFlags.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(mapped_r, 1)
            os.write(done_w, b"closed" if ask(connect(), b'{"kind": "stop"}') == b"" else b"?")
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"u"
        with open(f"/proc/{child}/uid_map", "w") as f:
            f.write(f"{os.getuid()} {os.getuid()} 1\n")
        os.write(mapped_w, b"m")
        assert os.read(done_r, 16) == b"closed"
    finally:
        os.waitpid(child, 0)
        for fd in (ready_r, ready_w, mapped_r, mapped_w, done_r, done_w):
            os.close(fd)
    time.sleep(1)    # a negative, as above: what a stop would have done by now
    assert alive([template]) and warm.template_pid() == template


@ROOT_ONLY
def test_template_refuses_a_client_of_another_uid(template, user_base):
    # The base is 0700: another uid reaches the socket here only through a hard link
    # (root made it; the socket's own mode opened to all) to ask the template to stop.
    base, tmpdir = user_base
    link = os.path.join(tmpdir, "template.sock")
    os.link(warm.socket_path(), link)
    os.chmod(link, 0o777)
    client = ("import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
              "s.connect(sys.argv[1])\ntry:\n s.sendall(b'{\"kind\": \"stop\"}'); "
              "print(repr(s.recv(64)))\nexcept OSError as e:\n print(type(e).__name__)")
    done = subprocess.run([sys.executable, "-c", client, link], user=OTHER_UID,
                          group=OTHER_UID, extra_groups=[], capture_output=True, text=True,
                          timeout=30)
    assert done.stdout.strip() in ("b''", "BrokenPipeError", "ConnectionResetError"), done
    time.sleep(1)    # a negative, as above: what a stop would have done by now
    assert alive([template]) and warm.template_pid() == template


def test_template_socket_is_hidden_from_kernels(template, user_base, workdir, socket_base):
    # Whatever Sandbox.socket_dir says, and even where a bind shows the base's parent, no
    # kernel (of this user's uid) sees the template's socket to ask it for anything.
    base, _ = user_base
    runtime = os.path.dirname(base)
    name = write_spec(f"isolated-{os.path.basename(socket_base)}",
                      [f"--socket-dir={socket_base}", f"--ro-bind={runtime}"])
    k = start_kernel(workdir, kernel_name=name)
    try:
        assert k.value(f"__import__('os').path.isdir({runtime!r})")
        assert not k.value(f"__import__('os').path.exists({warm.socket_path()!r})")
    finally:
        stop_kernel(k)


def test_provisioner_kernels_come_from_the_template(workdir_module):
    # JupyterLab's path: the provisioner's direct ipc, warm by default as well.
    k = start_kernel(workdir_module, kernel_name=write_spec("warm-provisioner", provisioner=True))
    try:
        assert k.km.get_connection_info()["transport"] == "ipc"
        assert k.value(STARTED) == "warm"
        assert k.value("__import__('os').getpid()") == 2
        interrupt_busy_loop(k)
    finally:
        stop_kernel(k)


# -- never stale: a template serves only what is installed now ----------------------------

@pytest.fixture
def venv(request):
    """A venv of its own whose interpreter finds ipykernel and ns_kernel where the tests'
    own does: (its python, its site-packages, the pid of its template or None)."""
    from conftest import stop_templates
    import glob
    import sysconfig
    root = tempfile.mkdtemp(prefix="nsk-venv-")
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    venv = os.path.join(root, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    request.addfinalizer(lambda: stop_templates(python))
    site = glob.glob(os.path.join(venv, "lib", "python*", "site-packages"))[0]
    with open(os.path.join(site, "_tests_venv.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    def template():
        out = subprocess.run([python, "-c", "from ns_kernel import warm; print(warm.template_pid())"],
                             check=True, capture_output=True, text=True).stdout.strip()
        return None if out == "None" else int(out)
    return python, site, template


def started_warm(k):
    return k.value(STARTED) == "warm"


def test_a_pip_install_retires_the_template(workdir, venv, tmp_path):
    """A package the template imported (here through a .pth file, as every interpreter
    of the venv does at its start) is upgraded with pip: the next kernel has the new
    version, the old template exits, and the kernel after that is warm again."""
    from conftest import make_wheel
    python, site, template = venv
    wheels = str(tmp_path)

    def install(version):
        wheel = make_wheel(wheels, "nskprobe", version, f"VERSION = {version!r}",
                           {"nskprobe.pth": "import nskprobe\n"})
        subprocess.run([sys.executable, "-m", "pip", "-q", "--python", python, "install",
                        "--no-index", "--no-deps", "-U", wheel], check=True)

    def version_and_how(k):
        return k.value("__import__('sys').modules['nskprobe'].VERSION"), started_warm(k)

    install("1.0")
    name = write_spec("warm-venv", python=python)
    for k in (start_kernel(workdir, kernel_name=name), start_kernel(workdir, kernel_name=name)):
        try:
            assert version_and_how(k) == ("1.0", True)
        finally:
            stop_kernel(k)
    old = template()
    assert old is not None
    install("2.0")
    k = start_kernel(workdir, kernel_name=name)
    try:
        # With what is installed now: exec'd fresh inside the sandbox, by the old template's
        # last request; or, where pip took longer than an idle template's look at what it
        # imported (template.STALE_CHECK: a loaded machine), from a new template, the old
        # one having left by itself.
        assert version_and_how(k)[0] == "2.0"
    finally:
        stop_kernel(k)
    assert gone(old)
    k = start_kernel(workdir, kernel_name=name)
    try:
        assert version_and_how(k) == ("2.0", True)
        assert template() not in (None, old)
    finally:
        stop_kernel(k)


def test_an_idle_template_leaves_once_what_it_imported_changes(workdir, venv, tmp_path):
    """A newer ns_kernel (here: another package it imported) installed while no kernel
    starts: the template leaves by itself, without waiting for a request (a newer
    ns_kernel's kernels go to a template of their own, and two would linger)."""
    from conftest import make_wheel
    from ns_kernel.template import STALE_CHECK
    python, _, template = venv

    def install(version):
        wheel = make_wheel(str(tmp_path), "nskidle", version, f"VERSION = {version!r}",
                           {"nskidle.pth": "import nskidle\n"})
        subprocess.run([sys.executable, "-m", "pip", "-q", "--python", python, "install",
                        "--no-index", "--no-deps", "-U", wheel], check=True)
    install("1.0")
    k = start_kernel(workdir, kernel_name=write_spec("warm-venv-idle", python=python))
    try:
        assert started_warm(k)
        # Its template: the monitor's parent (asking the template would be a request).
        old = parent_pid(parent_pid(parent_pid(kernel_host_pid(k))))
    finally:
        stop_kernel(k)
    install("2.0")
    assert wait_until(lambda: gone(old), timeout=STALE_CHECK + 10)


def test_a_replaced_shared_library_retires_the_template(workdir, venv, tmp_path):
    """A shared library the template mapped (not a module: what a libc or libssl upgrade
    replaces) is replaced on disk: the next kernel execs fresh and says why, and the old
    template exits."""
    python, site, _ = venv
    # In the venv (the sandbox shows it), off sys.path, loaded by every interpreter of the
    # venv at its start, the template's included.
    lib = os.path.realpath(os.path.join(os.path.dirname(python), "..", "lib", "nskprobe",
                                        "libnskprobe.so"))
    os.makedirs(os.path.dirname(lib))
    shutil.copy(system_library("libz.so.1"), lib)
    with open(os.path.join(site, "nskprobe-lib.pth"), "w") as f:
        f.write(f"import ctypes; ctypes.CDLL({lib!r})\n")
    name = write_spec("warm-venv-lib", python=python)
    for k in (start_kernel(workdir, kernel_name=name), start_kernel(workdir, kernel_name=name)):
        try:
            assert k.value(f"{lib!r} in open('/proc/self/maps').read()")
            assert started_warm(k)
            # Its template: the monitor's parent (asking the template itself would fork a
            # staleness check that could see the replacement below and retire it first).
            old = parent_pid(parent_pid(parent_pid(kernel_host_pid(k))))
        finally:
            stop_kernel(k)
    # As a package manager replaces a library: a new file renamed over the old one.
    shutil.copy(lib, tmp_path / "new.so")
    os.replace(tmp_path / "new.so", lib)
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=name, stderr=stderr)
        try:
            assert not started_warm(k)
        finally:
            stop_kernel(k)
    assert f"warm template retired: {lib} changed" in log.read_text()
    assert gone(old)


def system_library(soname):
    """Where the system's shared library soname is (loaded here to read it from the maps)."""
    import ctypes
    ctypes.CDLL(soname)
    with open("/proc/self/maps") as maps:
        return next(line.split()[-1] for line in maps if f"/{soname}" in line)


# -- a warm kernel whose Jupyter server dies, or holds many fds ----------------------------
# The provisioner, in the Jupyter server, asks the warm template for the launcher itself;
# that launcher dies with its requester, the server, and leaves nothing.

# A Jupyter server of its own that dies (SIGKILL: the OOM killer, a crash, `kill -9`) after
# it started a kernel: while the kernel starts (the moment the launcher has made the
# kernel's socket dir), or once it runs (it answered).
SERVER_THAT_DIES = """
import os, signal, sys, uuid
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir
kid = str(uuid.uuid4())
os.makedirs(jupyter_runtime_dir(), exist_ok=True)
km = KernelManager(kernel_name=sys.argv[1],
                   connection_file=os.path.join(jupyter_runtime_dir(), f"kernel-{kid}.json"))
km.start_kernel(cwd=sys.argv[2])
box = km.provisioner.kernel_socket_dir
print(type(km.provisioner.process).__name__, kid, box, flush=True)
if sys.argv[3] == "starting":
    while not os.path.lexists(box):
        pass
else:
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("moment", ["starting", "running"])
def test_a_server_killed_with_a_warm_kernel_leaves_nothing(workdir, moment):
    # Attack: make the Jupyter server die (any local way: exhaust memory so the OOM killer
    # picks it, crash it, or just a user's kill -9) right after it asked for a kernel.
    # On the provisioner's warm path the launcher is forked by the template and dies with
    # its requester, now the server itself (template._die_with: os._exit(137) at once).
    # While the launcher is still building the start (cgroup made, socket dir made, plan
    # not yet handed to the monitor), nobody removes what it made: the kernel's socket dir
    # (with connection.json, the kernel's HMAC key, owned by the sandbox's uid) and its
    # cgroup stay behind, once per such death. Once the kernel runs, two threads of the
    # launcher see the server go at once: the supervision loop (JPY_PARENT_PID) SIGKILLs the monitor,
    # whose own cleanup (sandbox._supervise) then never runs, and _die_with's thread exits
    # the launcher before Supervisor.cleanup does: the same two things would stay. (A cold
    # launcher's requester outlives the server: only the supervision loop sees it go, and
    # Supervisor.cleanup removes both.)
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template runs
    leaks = []
    try:
        for _ in range(5):
            server = subprocess.run([sys.executable, "-c", SERVER_THAT_DIES, PROVISIONED, workdir, moment],
                                    stdout=subprocess.PIPE, text=True, timeout=120)
            kind, kid, box = server.stdout.split()
            assert kind == "Launcher"       # the new path, not the client
            wait_until(lambda: not os.path.lexists(box) and not kernel_cgroups(kid),
                       timeout=10)
            if os.path.lexists(box) or kernel_cgroups(kid):
                leaks.append((box, os.listdir(box) if os.path.isdir(box) else None,
                              kernel_cgroups(kid)))
                # Ours to clean, so the run leaves nothing whatever the outcome.
                subprocess.run(["rm", "-rf", box])
                for group in kernel_cgroups(kid):
                    os.rmdir(group)
    finally:
        stop_kernel(first)
    assert not leaks, f"left behind by a warm start whose server died: {leaks}"


def test_a_server_holding_many_fds_still_controls_its_warm_kernel(workdir):
    # Attack: another local user opens ~1000 idle TCP connections to the Jupyter server's
    # port (127.0.0.1:8888 takes anyone's; tornado keeps an idle one for an hour), or the
    # server is merely busy (kernels, terminals, websockets): jupyter_server raises its
    # open-files limit to 4096 for this, so new fds are numbered above 1023. A kernel
    # started then gets a warm.Launcher whose socket is such an fd, and Launcher.poll and
    # wait use select.select, which refuses fds >= FD_SETSIZE (ValueError): the server can
    # no longer tell whether the kernel lives (is_alive), restart or shut it down, ever
    # (the fd keeps its number when the connections close); the sandbox runs on until
    # the server exits. A Popen'd client (the argv path) is polled with waitpid, which has
    # no such limit. Here this process is the server.
    first = start_kernel(workdir, kernel_name=KERNEL_NAME)     # the template runs
    # Once first, as a server has: what a first start imports and lets go is done with.
    stop_kernel(start_kernel(workdir, kernel_name=PROVISIONED))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # What jupyter_server does at start (ServerApp.min_open_files_limit).
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    k = None
    try:
        gc.collect()    # no file object of the test's own closes meanwhile
        # Connections take the lowest free fds: until none is left below 1024.
        while not held or held[-1].fileno() < 1024:
            client = socket.create_connection(listener.getsockname())
            held += [client, listener.accept()[0]]
        k = start_kernel(workdir, kernel_name=PROVISIONED)
        launcher = k.km.provisioner.process
        assert type(launcher).__name__ == "Launcher"     # the new path, not the client
        assert k.km.is_alive()
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=30)
        stop_kernel(k)
        assert not k.km.has_kernel
        k = None
    finally:
        for sock in (*held, listener):
            sock.close()
        if k is not None:       # what the server could not do: end the kernel
            k.kc.stop_channels()
            launcher = k.km.provisioner.process
            launcher.kill()
            wait_until(lambda: not os.path.exists(f"/proc/{launcher.pid}"), timeout=10)
            wait_until(lambda: not os.path.lexists(k.km.provisioner.kernel_socket_dir), timeout=10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stop_kernel(first)


# -- what a template's children signal once it has gone ------------------------------------
# The template's children signal it through a pidfd, never as os.getppid(): once the
# template has gone, that is whoever adopted them (PID 1, systemd --user, tini). The tests
# run the template under a subreaper of their own (REAPER), never this host's PID 1.

# Run as a subprocess: a child subreaper that starts a template of its own (below it, so
# that it adopts the template's orphans), plays the scenario, and prints who sent it a
# SIGTERM, if anyone did. It refuses to play unless the template really is its child, and
# kills whatever is left below it before it exits.
REAPER = r"""
import ctypes, os, signal, socket, sys, time
from ns_kernel import warm
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
scenario, stale_dir = sys.argv[1], sys.argv[2]
path = warm.socket_path()
warm.connect_or_start(path).close()
template = warm.template_pid(path)
# Held pending from now on (not before: the template would inherit the mask), to be read
# with its sender at the end.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def children(pid):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if ppid(int(entry)) == pid:
                found.append(int(entry))
        except (OSError, IndexError):
            pass
    return found


def sockets(pid):
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def wait_exit(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.02)
    raise SystemExit(f"pid {pid} did not exit")


# The pair the template keeps forked: the server child holds the listener, as the
# template does; the spare monitor does not. None while the pairs the connections above
# took are still leaving.
def pair_now():
    pair = children(template)
    try:
        server = [p for p in pair if sockets(p) & sockets(template)]
    except OSError:
        return None
    spare = [p for p in pair if p not in server]
    return (server[0], spare[0]) if len(server) == 1 and len(spare) == 1 else None


# A client connected (the first pair takes it), then the template stopped by another.
def connected_then_stopped():
    global beside
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(path)
    time.sleep(0.5)     # the point: a request slow to come (a loaded box)
    beside = children(template)     # the pair that takes the stop below
    assert warm.stop(path)
    wait_exit(template)
    return client


def play():
    global server, spare, beside
    assert ppid(template) == os.getpid(), "not below this subreaper: refusing to play"
    deadline = time.monotonic() + 20
    seen = None
    while time.monotonic() < deadline:
        now = pair_now()
        if now and now == seen:
            break
        seen = now
        time.sleep(0.3)
    assert now and now == seen, (now, seen)
    server, spare = [now[0]], [now[1]]
    if scenario == "stop":
        # A client whose request is slow to come (a loaded box), and meanwhile the template
        # is stopped by another client (two `python -m ns_kernel.warm stop` at once); then the
        # first one's stop arrives: its server child kills its parent, no longer the template.
        slow = connected_then_stopped()
        slow.sendall(b'{"kind": "stop"}')
        slow.recv(1)
        slow.close()
    else:
        # A pip install changes a dir of the template's sys.path (it is stale now), and the
        # spare is descheduled a moment (SIGSTOP stands for a loaded box) just as its request
        # comes; meanwhile the template goes (stopped here; retired by another spare, or
        # idle, the same). Then the spare runs its staleness check, and retires "the template".
        # The spare beside the stop, told TAKEN by the stop request itself, often gets there
        # first, without any SIGSTOP (SIGTERMs pending coalesce: the first sender is named).
        os.kill(spare[0], signal.SIGSTOP)
        with open(os.path.join(stale_dir, "installed.pth"), "w"):
            pass
        taker = connected_then_stopped()
        os.kill(spare[0], signal.SIGCONT)
        time.sleep(1)       # the point: the spare, running again, acts on a gone template
        taker.close()


def below(pid):
    found = []
    for child in children(pid):
        found += [child, *below(child)]
    return found


server = spare = beside = ()
try:
    play()
    # A negative: what the orphans would signal (below) has no event of its own to wait
    # on; they act within milliseconds of the template going.
    time.sleep(1)
finally:
    # Everything the template left is ours now: nothing below us may outlive us (and
    # signal PID 1 later), stopped or not. Then reap it all.
    for pid in below(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
        except ChildProcessError:
            break
got = signal.sigtimedwait({signal.SIGTERM}, 0)
if got is None:
    print("none", flush=True)
else:
    roles = {**{p: "a child of the pair that took the stop" for p in beside},
             **{p: "the server child of the first request" for p in server},
             **{p: "the spare monitor of the first request" for p in spare},
             template: "the template"}
    print(f"SIGTERM from pid {got.si_pid} ({roles.get(got.si_pid, 'another process')})",
          flush=True)
"""


@pytest.fixture
def stale_dir():
    """A dir on the sys.path of the template the test starts (PYTHONPATH is part of its
    startup environment: a template of its own)."""
    path = tempfile.mkdtemp(prefix="nsk-stale-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("scenario", ["stop", "retire"])
def test_a_template_child_never_signals_whoever_adopted_it(user_base, stale_dir, scenario):
    # Bad luck, twice: "stop": two stops at once, the first one slow to say its word
    # (template._serve: os.kill(os.getppid(), SIGTERM)); "retire": a pip install while
    # two kernels start, the first spare retires the template, the second (its server had
    # accepted: PR_SET_PDEATHSIG cleared) checks after the template has gone
    # (template._retire checks that getppid() did not change between its two reads, not
    # that it is still the template). Either way the SIGTERM meant for the template goes
    # to whoever adopted the orphan; as root on this host, PID 1. A run of concurrent
    # junk requests after a pip install hit "retire" without any SIGSTOP (1 in 6 here), and
    # so did a plain `python -m ns_kernel.warm stop` right after a change to a sys.path
    # dir (1 in 5): the stop's server kills the template while the spare, told TAKEN by
    # that very stop request, is still checking staleness.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [stale_dir, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", REAPER, scenario, stale_dir], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none", (
        f"the adopter of the template's orphans got a {done.stdout.strip()}, meant for the "
        "template")


# -- a template's word to the client that started it ---------------------------------------
# A template that dies as it starts says why at once (LISTENING, LOCKED or FAILED on a
# pipe) and leaves no lock; it keeps none of its first client's other fds; a socket base
# too long for a Unix socket starts the kernel cold.

PATHS = start_paths("template-word")


def read(log):
    log.seek(0)
    return log.read()


def warm_lines(text):
    return [line for line in text.splitlines() if line.startswith("ns-kernel: warm start:")]


def start_all(n, workdir, tmp_path, path):
    """n kernels of the start path, started at once; their launchers' logs."""
    kms, logs = [], []
    for i in range(n):
        logs.append(open(tmp_path / f"launcher-{i}.log", "w+"))
        km = KernelManager(kernel_name=PATHS[path])
        km.start_kernel(cwd=workdir, stderr=logs[-1])
        kms.append(km)
    return kms, logs


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_clients_that_lose_the_lock_to_a_dying_template_start_at_once(user_base, workdir,
                                                                      tmp_path, path):
    # Three first kernels at once, each client starting a template: one wins the path's
    # lock and dies at its socket path (a directory: nothing can unlink or bind it). The
    # others were told LOCKED ("another one is about to listen") and wait 60 s for nobody
    # (60.7 s measured), past Jupyter's own start timeout.
    base, _ = user_base
    os.makedirs(base, mode=0o700)
    os.mkdir(warm.socket_path())
    kms, logs = start_all(3, workdir, tmp_path, path)
    try:
        # Not a time limit: a hang's detector, half the 60 s one client used to wait.
        for i, log in enumerate(logs):
            assert wait_until(lambda: warm_lines(read(log)), timeout=30), \
                f"launcher {i} said nothing in 30 s: {[warm_lines(read(log)) for log in logs]}"
        lines = [warm_lines(read(log))[0] for log in logs]
        assert not [line for line in lines if "never listened" in line], lines
    finally:
        for km in kms:
            km.shutdown_kernel(now=True)
        for log in logs:
            log.close()


@pytest.mark.parametrize("path", ["argv", "provisioner"])
@pytest.mark.parametrize("which", ["socket", "lock"])
def test_a_template_that_dies_after_its_imports_says_why_and_leaves_no_lock(
        user_base, workdir, tmp_path, path, which):
    # The template's imports went well; then its lock file (which="lock") or its socket
    # path ("socket") is a directory. The client hears EOF and logs "it died as it
    # started": the template knew why (EISDIR) and did not say; after the socket's failure
    # its lock file stays behind.
    base, _ = user_base
    os.makedirs(base, mode=0o700)
    sock = warm.socket_path()
    os.mkdir(sock if which == "socket" else sock + ".lock")
    kms, logs = start_all(1, workdir, tmp_path, path)
    try:
        assert wait_until(lambda: warm_lines(read(logs[0])), timeout=30), read(logs[0])
    finally:
        kms[0].shutdown_kernel(now=True)
        said = read(logs[0])
        logs[0].close()
    line = warm_lines(said)[0]
    assert os.strerror(errno.EISDIR) in line, line
    if which == "socket":
        assert wait_until(lambda: not os.path.exists(sock + ".lock"), timeout=5), \
            os.listdir(base)


def test_the_first_clients_other_fds_do_not_outlive_it(user_base, workdir, tmp_path):
    # A client started with an fd of its caller's beyond stdio (a shell's 3>, make's
    # jobserver pipe): the template it spawns inherits it, keeps it for as long as it
    # lives (IDLE_EXIT, 10 min), and every kernel's launcher, monitor and init forked
    # from it holds it too (a host fd in the sandbox's PID 1). The caller waiting for the
    # pipe's EOF waits for the template. (The provisioner's clients, Popen'd with
    # close_fds, have only their stdio: argv path only.)
    conn = str(tmp_path / "kernel-14d.json")
    write_connection_file(conn, ip=LOOPBACK)
    theirs, given = os.pipe()
    log = open(tmp_path / "launcher.log", "w+")
    client = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "-f", conn],
                              cwd=workdir, pass_fds=(given,), stderr=log)
    os.close(given)
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient()
    kc.load_connection_file(conn)
    kc.start_channels()
    try:
        # Not wait_for_ready: without a manager it takes a heartbeat that has not beaten
        # within its first second for a dead kernel, and this start makes the template.
        kc.kernel_info()
        assert kc.get_shell_msg(timeout=60)["msg_type"] == "kernel_info_reply"
        assert warm.template_pid() is not None, read(log)   # a warm start, not a cold one
    finally:
        kc.shutdown()
        kc.stop_channels()
        try:
            client.wait(30)
        finally:
            client.kill()
            client.wait()
            log.close()
    hears = select.poll()
    hears.register(theirs, select.POLLIN)
    # Once the kernel's processes have gone, nobody but the template could hold it.
    eof = wait_until(lambda: bool(hears.poll(0)) and os.read(theirs, 1) == b"", timeout=10)
    os.close(theirs)
    assert eof, f"the template {warm.template_pid()} still holds the first client's fd"


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_socket_base_too_long_for_the_template_starts_the_kernel_cold(workdir, monkeypatch,
                                                                        path):
    # $XDG_RUNTIME_DIR so long that <it>/ns-kernel/warm-KEY.sock passes the 107 bytes of a
    # Unix socket path; the kernels' socket dirs are elsewhere (--socket-dir). warm._connect
    # raised OSError "AF_UNIX path too long", which nobody caught: in the client a
    # traceback, exit 1, no kernel; in the provisioner (the Jupyter server) a failed start.
    runtime = tempfile.mkdtemp(prefix="nsk-run-")
    long_dir = os.path.join(runtime, "r" * (100 - len(runtime)))
    os.mkdir(long_dir)
    sockets = tempfile.mkdtemp(prefix="nsk-sd-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", long_dir)
    name = write_spec(f"template-word-short-socket-dir-{path}", [f"--socket-dir={sockets}"],
                      provisioner=path == "provisioner")
    log = tempfile.TemporaryFile("w+")
    try:
        k = start_kernel(workdir, kernel_name=name, stderr=log)
        try:
            assert k.value("1 + 1") == 2
        finally:
            stop_kernel(k)
        assert "Traceback" not in read(log), read(log)
        assert len(warm_lines(read(log))) == 1, read(log)
    finally:
        log.close()
        stop_templates()
        for path in (runtime, sockets):
            shutil.rmtree(path, ignore_errors=True)


# -- the hand-off: the monitor alone, once the launcher has left ---------------------------
# A warm launcher hands its running kernel to the sandbox's monitor and exits; from then
# on the monitor relays the output, watches the server and the requester, writes the death
# notice and removes what the launcher made, and the requester what a killed monitor left.

def kernel_cgroups_of(pid):
    """The host dirs of the ns-kernel cgroups pid is in, in every hierarchy."""
    mounts = cgroup.hierarchies()
    found = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            if "/ns-kernel-" in path:
                name = controllers.split(",")[0] or "cgroup2"
                found.append(mounts[name][0] + path)
    return sorted(set(found))


def handed_off(monitor, log):
    """The monitor has taken over from a warm launcher: its stderr is the server's log
    (taken_over), no longer the kernel's pipe."""
    try:
        return os.readlink(f"/proc/{monitor}/fd/2") == str(log)
    except OSError:
        return False


@pytest.mark.parametrize("path, options", [("argv", []), ("argv", ["--cold"]),
                                           ("provisioner", []), ("provisioner", ["--cold"])],
                         ids=["argv-warm", "argv-cold", "provisioner-warm", "provisioner-cold"])
def test_a_killed_monitor_leaves_nothing_behind(workdir, socket_base, tmp_path, path, options):
    # Attack: SIGKILL the sandbox's monitor of a running kernel (the user may: it is their
    # uid, as is the kernel's for an ordinary user; root may; so may the OOM killer, now
    # that the monitor holds the launcher's state and is no longer in the kernel's cgroup).
    # A cold launcher sees its monitor go, and removes the ipc links, the socket dir and
    # the kernel's cgroup at once. Once a warm launcher has handed off, only the monitor and
    # the requester know them: the requester must remove them, or on the argv path (an ipc
    # connection) all three would stay for good, and on the provisioner's the cgroup.
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}", *options], provisioner=path != "argv")
    log = tmp_path / "server.log"
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path == "argv" else {}
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=name, stderr=stderr, **ipc)
    links = [str(tmp_path / f"kernel-ipc-{k.km.shell_port}")] if ipc else []
    groups = []
    try:
        assert all(map(os.path.islink, links)) and len(os.listdir(socket_base)) == 1
        ns = k.value("__import__('os').readlink('/proc/self/ns/pid')")
        monitor = parent_pid(parent_pid(kernel_in_pid_namespace(ns)))
        if not options:
            assert wait_until(lambda: handed_off(monitor, log))
        groups = kernel_cgroups_of(kernel_in_pid_namespace(ns))
        assert bool(groups) == (LIMITS_BACKEND != "rlimit")
        os.kill(monitor, signal.SIGKILL)
        assert wait_until(lambda: not k.km.is_alive(), timeout=20)
        assert wait_until(lambda: not alive([monitor]))
        wait_until(lambda: not any(map(os.path.lexists, links)) and not os.listdir(socket_base)
                   and not any(map(os.path.isdir, groups)), timeout=3)
        left = {"links": [p for p in links if os.path.lexists(p)],
                "socket dirs": os.listdir(socket_base),
                "cgroups": [g for g in groups if os.path.isdir(g)]}
    finally:
        stop_kernel(k)
        # Ours to clean, whatever the outcome.
        for link in links:
            if os.path.lexists(link):
                os.unlink(link)
        for box in os.listdir(socket_base):
            subprocess.run(["rm", "-rf", os.path.join(socket_base, box)])
        for group in groups:
            if os.path.isdir(group):
                os.rmdir(group)
    assert not any(left.values()), f"left behind by a killed monitor: {left}"



@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_kernel_dead_before_a_late_hand_off_keeps_its_status(workdir, socket_base, tmp_path,
                                                               path):
    # Attack (or a busy host): the launcher is late to hand the kernel over, and the kernel
    # dies meanwhile. Here the server's log is not read for a moment (a paused terminal,
    # a slow journal), so the launcher's "limits" line blocks it just before the hand-off,
    # while the kernel, sockets bound, exits in its first line (exec_lines). The monitor
    # sees init go and exits; the launcher then hands the kernel to nobody.
    import fcntl
    import threading
    from jupyter_client.manager import KernelManager
    from conftest import in_pid_namespace
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}"], provisioner=path == "provisioner")
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path == "argv" else {}
    km = KernelManager(kernel_name=name, **ipc)
    read, write = os.pipe()
    os.write(write, b"\n" * fcntl.fcntl(write, 1032))     # F_GETPIPE_SZ: full
    marker = os.path.join(workdir, "died")
    try:
        km.start_kernel(cwd=workdir, stderr=write, extra_arguments=[
            "--IPKernelApp.exec_lines=import os; open('died', 'w').write("
            "os.readlink('/proc/self/ns/pid')); os._exit(3)"])
    finally:
        os.close(write)
    log = []
    def drain():
        with open(read, "rb") as f:
            log.append(f.read())
    reader = threading.Thread(target=drain)
    try:
        assert wait_until(lambda: os.path.exists(marker) and pathlib.Path(marker).read_text(),
                          timeout=60)
        ns = pathlib.Path(marker).read_text()
        assert wait_until(lambda: not in_pid_namespace(ns))
        # The point: the log stays unread a moment longer, while init and the monitor
        # leave (their pids are not known here: the kernel died in its first line).
        time.sleep(1)
        reader.start()
        assert wait_until(lambda: not km.is_alive(), timeout=20)
        code = km.provisioner.process.wait(timeout=5)
        wait_until(lambda: not os.listdir(socket_base), timeout=5)
        left = os.listdir(socket_base)
    finally:
        km.shutdown_kernel(now=True)
        if reader.ident is None:     # not started: the launcher may wait on its log
            reader.start()
        reader.join(timeout=10)
    said = [line for line in b"".join(log).decode().splitlines() if line.startswith("ns-kernel:")]
    assert (code, left) == (3, []), said
    assert said[-1].endswith("exited with status 3"), said


@pytest.mark.skipif(os.getuid() != 0, reason="root's monitor has no capability on the host: "
                    "an ordinary user's has the user's own access, as its launcher had")
@pytest.mark.parametrize("path", ["argv", "provisioner", "cold"])
def test_root_kernel_death_notice_in_a_runtime_dir_root_does_not_own(workdir, socket_base,
                                                                     tmp_path, path):
    # Root runs the Jupyter server with its runtime dir (the connection file's) in a dir of
    # another user's, 0700 (`sudo jupyter lab` keeping the user's HOME; a shared runtime
    # dir). The launcher, root on the host, reads and writes there by CAP_DAC_OVERRIDE.
    # The monitor it hands the kernel to is root in a user namespace of its own, with no
    # capability on the host: it cannot reach the connection file to keep why the kernel
    # died, and the restarted kernel is never told.
    import json
    from jupyter_client.manager import KernelManager
    from ns_kernel import notice
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 12345, 12345)     # nobody's: not root's, not the sandbox's
    name = write_spec(f"isolated-{os.path.basename(socket_base)}-{path}",
                      [f"--socket-dir={socket_base}", *(["--cold"] if path == "cold" else [])],
                      provisioner=path == "provisioner")
    ipc = {"transport": "ipc", "ip": str(tmp_path / "kernel-ipc")} if path != "provisioner" else {}
    km = KernelManager(kernel_name=name, connection_file=str(runtime / "kernel-1.json"), **ipc)
    km.start_kernel(cwd=workdir)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute("import os; os._exit(3)")
        assert wait_until(lambda: not km.is_alive(), timeout=20)
        assert km.provisioner.process.wait(timeout=5) == 3
        with open(km.connection_file) as f:
            told = json.load(f).get(notice.NOTICE_KEY, "")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert told.endswith("exited with status 3"), told
