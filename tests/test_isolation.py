"""Isolation, probed from code running inside real kernels: two kernels side by side cannot
see or touch each other, nor the host."""
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import (COLD_NAME, KERNEL_NAME, start_kernel, stop_kernel, stop_templates,
                      wait_until, write_spec)

IPC_HELPERS = r'''
import ctypes, ctypes.util, os
libc = ctypes.CDLL(None, use_errno=True)
librt = ctypes.CDLL(ctypes.util.find_library("rt"), use_errno=True)
librt.mq_open.restype = ctypes.c_int
def shm_get(key, create):
    r = libc.shmget(key, 4096, (0o1000 | 0o600) if create else 0)
    return r if r >= 0 else -ctypes.get_errno()
def msg_get(key, create):
    r = libc.msgget(key, (0o1000 | 0o600) if create else 0)
    return r if r >= 0 else -ctypes.get_errno()
def mq(name, create):
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    r = librt.mq_open(name.encode(), flags, 0o600, None)
    return r if r >= 0 else -ctypes.get_errno()
'''


# The ways in: the argv launcher with its TCP bridge (clients that ignore provisioners)
# and the provisioner's direct ipc sockets (JupyterLab, nbclient), both from the warm
# template (the default); a cold start with the kernel's interpreter prestarted
# (prestart.py, --cold); the kernel exec'd once the sandbox is built (what --no-prestart
# and every fallback do). Every probe below runs on each.
PATHS = {"argv": KERNEL_NAME,
         "provisioner": write_spec("isolated-python-provisioned", provisioner=True),
         "cold": COLD_NAME,
         "exec": write_spec("isolated-python-no-prestart", ["--no-prestart"]),
         # A network of its own's way out (test_proxy.py) must keep the rest as it was.
         "proxy": write_spec("isolated-python-proxy", ["--network", "proxy"])}


@pytest.fixture(scope="module", params=list(PATHS))
def pair(request):
    wd = tempfile.mkdtemp(prefix="ns-kernel-iso-")
    os.chmod(wd, 0o777)
    os.environ["JUPYTERHUB_API_TOKEN"] = "hub-secret-token"
    try:
        a, b = start_kernel(wd, kernel_name=PATHS[request.param]), \
            start_kernel(wd, kernel_name=PATHS[request.param])
    finally:
        del os.environ["JUPYTERHUB_API_TOKEN"]
    for k in (a, b):
        k.execute(IPC_HELPERS)
    yield a, b, wd
    stop_kernel(a)
    stop_kernel(b)
    stop_templates()   # a template outlives its kernels by design; the tests leave none
    import shutil
    shutil.rmtree(wd, ignore_errors=True)


def test_pid_namespace(pair):
    a, _, _ = pair
    assert a.value("__import__('os').getpid()") == 2
    assert a.value("__import__('os').getppid()") == 1
    pids = a.value("sorted(int(p) for p in __import__('os').listdir('/proc') if p.isdigit())")
    assert pids[:2] == [1, 2] and len(pids) < 10, pids
    # A PID namespace of its own, not the host's (this process's)...
    ns = "__import__('os').readlink('/proc/self/ns/pid')"
    assert a.value(ns) != os.readlink("/proc/self/ns/pid")
    # ...whose /proc shows none of the host's processes: a host process with a command
    # line of its own is not among those the kernel can list.
    host = subprocess.Popen(["sleep", "4343.5"])
    try:
        cmdlines = ("[open(f'/proc/{p}/cmdline', 'rb').read() for p in "
                    "__import__('os').listdir('/proc') if p.isdigit()]")
        def host_sees_it():
            with open(f"/proc/{host.pid}/cmdline", "rb") as f:
                return b"4343.5" in f.read()
        # The host sees it (once its exec has filled in the command line): a shared /proc would.
        assert wait_until(host_sees_it)
        assert not any(b"4343.5" in c for c in a.value(cmdlines))
    finally:
        host.kill()
        host.wait()


def test_processes_and_signals_do_not_cross(pair):
    a, b, _ = pair
    a.execute("import subprocess; marker = subprocess.Popen(['sleep', '4242'])")
    cmdlines = ("[open(f'/proc/{p}/cmdline','rb').read() for p in __import__('os').listdir('/proc')"
                " if p.isdigit()]")
    assert any(b"4242" in c for c in a.value(cmdlines))
    assert not any(b"4242" in c for c in b.value(cmdlines))
    # B can only signal its own processes: killing "everything" leaves A's sleeper alive.
    b.execute("import os, signal\nfor p in os.listdir('/proc'):\n"
              "    if p.isdigit() and int(p) > 2:\n"
              "        os.kill(int(p), signal.SIGKILL)")
    assert a.value("marker.poll()") is None
    a.execute("marker.kill(); marker.wait()")


def test_tmp_and_shm_are_private(pair):
    a, b, _ = pair
    a.execute("open('/tmp/from-a', 'w').write('a'); open('/dev/shm/from-a', 'w').write('a')")
    assert a.value("__import__('os').path.exists('/tmp/from-a')")
    assert not b.value("__import__('os').path.exists('/tmp/from-a')")
    assert not b.value("__import__('os').path.exists('/dev/shm/from-a')")
    assert not os.path.exists("/tmp/from-a") and not os.path.exists("/dev/shm/from-a")


def test_sysv_and_posix_ipc_are_private(pair):
    a, b, _ = pair
    assert a.value("shm_get(0x4e534b, True)") >= 0
    assert a.value("msg_get(0x4e534b, True)") >= 0
    assert a.value("mq('/nsk-queue', True)") >= 0
    assert a.value("shm_get(0x4e534b, False)") >= 0     # A sees its own
    assert b.value("shm_get(0x4e534b, False)") == -2    # ENOENT: B has its own IPC namespace
    assert b.value("msg_get(0x4e534b, False)") == -2
    assert b.value("mq('/nsk-queue', False)") == -2


def test_abstract_unix_sockets_do_not_cross(pair):
    a, b, _ = pair
    a.execute("import socket; abstract = socket.socket(socket.AF_UNIX); "
              "abstract.bind('\\0nsk-abstract'); abstract.listen()")
    probe = ("(lambda s: s.connect_ex('\\0nsk-abstract'))"
             "(__import__('socket').socket(__import__('socket').AF_UNIX))")
    assert a.value(probe) == 0
    assert b.value(probe) != 0
    host = socket.socket(socket.AF_UNIX)
    host.bind("\0nsk-host-abstract")
    host.listen()
    try:
        assert a.value(probe.replace("nsk-abstract", "nsk-host-abstract")) != 0
    finally:
        host.close()


def test_loopback_is_private(pair):
    a, b, _ = pair
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    port = host.getsockname()[1]
    try:
        connect = ("(lambda s: s.connect_ex(('127.0.0.1', {})))"
                   "(__import__('socket').socket())")
        assert a.value(connect.format(port)) != 0           # host listener unreachable
        a.execute(f"import socket; lst = socket.socket(); lst.bind(('127.0.0.1', {port})); "
                  "lst.listen()")                             # same port free inside A
        assert a.value(connect.format(port)) == 0
        assert b.value(connect.format(port)) != 0           # but not from B
    finally:
        host.close()
    assert a.value("[n for _, n in __import__('socket').if_nameindex()]") == ["lo"]
    routes = a.value("open('/proc/net/route').read().splitlines()[1:]")
    assert routes == []


def test_hostnames_differ(pair):
    a, b, _ = pair
    ha, hb = a.value("__import__('socket').gethostname()"), b.value(
        "__import__('socket').gethostname()")
    assert ha != hb and socket.gethostname() not in (ha, hb)
    assert ha.startswith("isolated-")


def test_connection_files_hidden(pair):
    a, b, _ = pair
    for k, other in ((a, b), (b, a)):
        assert not k.value(f"__import__('os').path.exists({other.km.connection_file!r})")
        assert not k.value(f"__import__('os').path.exists({k.km.connection_file!r})")
    assert not a.value("__import__('os').path.exists('/run/user')")


def test_runtime_dir_hidden_even_with_shared_home(workdir, monkeypatch):
    """jupyter_server keeps every kernel's connection file in the runtime dir under $HOME:
    with $HOME shared, the dir is still covered."""
    import uuid
    from jupyter_core.paths import jupyter_runtime_dir
    from conftest import write_spec
    # Where it is by default (the tests move Jupyter's data dir out of the home).
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR",
                       os.path.expanduser("~/.local/share/jupyter/runtime"))
    runtime = jupyter_runtime_dir()
    os.makedirs(runtime, exist_ok=True)
    other = os.path.join(runtime, "kernel-other.json")
    with open(other, "w") as f:
        f.write("{}")
    k = start_kernel(workdir, kernel_name=write_spec("isolated-shared-home", ["--home=shared"]),
                     connection_file=os.path.join(runtime, f"kernel-{uuid.uuid4()}.json"))
    try:
        home = os.path.expanduser("~")
        assert k.value(f"__import__('os').path.isdir({home!r})")
        # The home's dot entries are not shown at all, the runtime dir with them.
        assert not k.value(f"__import__('os').path.exists({runtime!r})")
        assert not k.value(f"__import__('os').path.exists({other!r})")
    finally:
        stop_kernel(k)
        os.unlink(other)


def test_identity_and_privileges(pair):
    a, _, _ = pair
    uid = a.value("__import__('os').getuid()")
    assert uid != 0
    assert uid == (65534 if os.getuid() == 0 else os.getuid())
    status = a.value("open('/proc/self/status').read()")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    # A new session with no controlling terminal: TIOCSTI has nothing to inject into.
    assert a.value("__import__('os').getsid(0) == __import__('os').getpid()")
    a.execute("def open_tty():\n    try:\n        __import__('os').open('/dev/tty', 0)\n"
              "        return 'opened'\n    except OSError as exc:\n"
              "        return __import__('errno').errorcode[exc.errno]")
    assert a.value("open_tty()") == "ENXIO"     # no controlling terminal


def test_secrets_not_in_environment(pair):
    a, _, _ = pair
    env = a.value("dict(__import__('os').environ)")
    assert "JUPYTERHUB_API_TOKEN" not in env
    assert env["JPY_PARENT_PID"] == "1"


CREATE = """
def try_create(path):
    try:
        open(path, 'w').close()
        return 'created'
    except OSError as exc:
        return __import__('errno').errorcode[exc.errno]
"""


def test_filesystem_policy(pair):
    a, _, wd = pair
    assert a.value("__import__('os').getcwd()") == wd
    a.execute("open('written-inside', 'w').write('hello')")
    with open(os.path.join(wd, "written-inside")) as f:
        assert f.read() == "hello"
    a.execute(CREATE)
    for path in ("/usr/nsk-probe", "/etc/nsk-probe", "/nsk-probe", sys.prefix + "/nsk-probe"):
        assert a.value(f"try_create({path!r})") in ("EROFS", "EACCES"), path
    assert a.value("try_create('/tmp/ok')") == "created"
    # $HOME is private: empty but for what the kernel itself wrote there.
    home = a.value("__import__('os').path.expanduser('~')")
    assert set(a.value(f"__import__('os').listdir({home!r})")) <= {".ipython", ".cache",
                                                                   ".local", ".config"}
    for absent in ("/var/run", "/run/dbus", "/tmp/.X11-unix", "/root/.ssh", "/srv", "/mnt"):
        assert not a.value(f"__import__('os').path.exists({absent!r})"), absent


def test_umount_cannot_reveal_host(pair):
    a, _, _ = pair
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "results = {}\nfor target in ('/proc', '/tmp', '/usr', '/'):\n"
            "    r = libc.umount2(target.encode(), 2)\n"
            "    results[target] = 0 if r == 0 else ctypes.get_errno()\n")
    _, error, _ = a.execute(code)
    assert error is None
    assert a.value("results") == {"/proc": 1, "/tmp": 1, "/usr": 1, "/": 1}   # EPERM
    assert len(a.value("[p for p in __import__('os').listdir('/proc') if p.isdigit()]")) < 10
