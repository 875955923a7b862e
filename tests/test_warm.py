"""Warm start (the default): kernels forked from a per-user template, with the same isolation
as a cold start (test_isolation.py runs every probe on warm kernels too) and nothing
carried from one kernel to the next."""
import json
import os
import pathlib
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import (KERNEL_NAME, LIMITS_BACKEND, alive, descendants, in_pid_namespace, interrupt_busy_loop,
                      kernel_cgroups, kernel_host_pid, parent_pid, process_state, start_kernel,
                      stop_kernel, wait_until, write_spec)
from ns_kernel import warm

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
        cmdline = k.value("open('/proc/self/cmdline', 'rb').read().split(b'\\0')")
        assert b"from ns_kernel.template import template_main" in cmdline[2], cmdline
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
            assert b"ns_kernel.template" not in k.value(
                "open('/proc/self/cmdline', 'rb').read()")    # a cold kernel
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
        cmdline = k.value("open('/proc/self/cmdline', 'rb').read().split(b'\\0')")
        assert b"from ns_kernel.template import template_main" in cmdline[2], cmdline
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
    return k.value("b'ns_kernel.template' in open('/proc/self/cmdline', 'rb').read()")


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
        # Exec'd fresh inside the sandbox, with what is installed now.
        assert version_and_how(k) == ("2.0", False)
    finally:
        stop_kernel(k)
    assert gone(old)
    k = start_kernel(workdir, kernel_name=name)
    try:
        assert version_and_how(k) == ("2.0", True)
        assert template() not in (None, old)
    finally:
        stop_kernel(k)


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
