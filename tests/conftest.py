"""Fixtures shared by the test tiers: a kernelspec for this interpreter, real kernels
started through jupyter_client, and a helper that runs code and collects what it printed.

The tiers (markers, registered in pyproject.toml), run fastest first: `pure` (plain
functions: plan, kernelspec dicts, argv and config parsing, error words; no namespaces),
`privileged` (real namespaces, no kernel), `kernel` (real kernels). A test is of its own
marker's tier, else of its module's (MODULE_TIERS), else `kernel`.

A run leaves the home and /tmp of whoever runs it as it found them: everything goes under
dirs of the run's own (_DATA, _TMP, and a HOME for Jupyter, IPython, matplotlib, Chromium
and Playwright), removed at the end with the warm templates the run started."""
import base64
import hashlib
import os
import shutil
import sys
import tempfile
import time
import zipfile

import pytest
from jupyter_client.manager import KernelManager

from ns_kernel import cgroup, kernelspec, limits, socketdir, titles, warm
from ns_kernel.argv import START_PATHS

KERNEL_NAME = "isolated-python"
# How a kernel started, as it can tell: a prestarted interpreter (prestart.py) and a warm
# template (warm.py) imported their own module before they became the kernel, an exec'd
# kernel neither. Its command line says the same whichever it was (titles.py).
STARTED = ("'warm' if 'ns_kernel.template' in __import__('sys').modules else "
           "'prestarted' if 'ns_kernel.prestart' in __import__('sys').modules else 'exec'")
# The kernel's command line, as words: an exec'd kernel's argv, or the title of one that was
# not, which is the same argv (titles.kernel).
COMMAND_LINE = "open('/proc/self/cmdline', 'rb').read().replace(b'\\0', b' ').split()"

TIERS = ("pure", "privileged", "kernel")
MODULE_TIERS = {"test_plan": "pure", "test_config": "privileged", "test_doctor": "privileged",
                "test_bad_input": "privileged"}

# One Jupyter data dir for the whole run, readable by every uid (root's sandbox is nobody).
_DATA = tempfile.mkdtemp(prefix="ns-kernel-test-")
os.chmod(_DATA, 0o755)
os.environ["JUPYTER_PATH"] = _DATA
# Kernels' persistent homes and packages (Sandbox.state_dir's default) go here, not into
# the home of whoever runs the tests.
os.environ["XDG_DATA_HOME"] = os.path.join(_DATA, "data")
# So does what Jupyter (~/.jupyter/migrated), Chromium (~/.config/chromium), Playwright's
# node (~/.npm/_logs), IPython, matplotlib and pip write into a home. Not under /tmp: the
# kernel's home is mounted at $HOME's path, and tests list the sandbox's /tmp.
_HOME = tempfile.mkdtemp(prefix="ns-kernel-test-home-", dir="/var/tmp")
os.environ["HOME"] = _HOME
for _name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "JUPYTER_CONFIG_DIR",
              "JUPYTER_DATA_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
    os.environ.pop(_name, None)
# The loopback address of this run's TCP kernels. jupyter_client picks a kernel's ports by
# binding port 0 and letting go before the kernel binds them; scripts/test runs two passes
# at once (root's, an ordinary user's), and a port one let go was at times taken by the
# other meanwhile. An address of each pass's own keeps their ports apart, as two hosts'.
LOOPBACK = os.environ.get("NS_KERNEL_TEST_LOOPBACK", "127.0.0.1")
if LOOPBACK != "127.0.0.1":
    from jupyter_client import localinterfaces
    localinterfaces.local_ips()     # loaded once: a later load would undo what follows
    localinterfaces.LOCALHOST = LOOPBACK
    localinterfaces.LOCAL_IPS.append(LOOPBACK)
# What the user's own kernels use, untouched: the socket base and the warm templates in it.
_BASE = socketdir.default_base()
_BASE_EXISTED = os.path.isdir(_BASE)
_IN_BASE_BEFORE = set(os.listdir(_BASE)) if _BASE_EXISTED else set()


# tmp_path and friends: in a dir of the run's own, not /tmp/pytest-of-USER. Not in _DATA:
# the launcher refuses a notebook folder inside Jupyter's data path (JUPYTER_PATH).
_TMP = tempfile.mkdtemp(prefix="ns-kernel-test-tmp-")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before the tmpdir plugin reads the option.
    if not config.option.basetemp:
        config.option.basetemp = os.path.join(_TMP, "pytest")


def pytest_collection_modifyitems(items):
    """Give every test its tier, and run the tiers in order (a broken plan fails in
    seconds, before any kernel starts)."""
    def tier(item):
        own = [m.name for m in item.iter_markers() if m.name in TIERS]
        if not own:
            own = [MODULE_TIERS.get(item.module.__name__, "kernel")]
            item.add_marker(own[0])
        return TIERS.index(own[0])
    items.sort(key=tier)


@pytest.fixture(autouse=True)
def _tier_kept(request, monkeypatch):
    """What a test uses must be of its tier: a pure test starts no process and enters no
    namespace, a privileged one starts no kernel through jupyter_client. Whatever does is
    stopped, with the tier it needs. (What a subprocess does in turn, a doctor's trial
    kernels, is not seen from here.)"""
    import subprocess
    tier = next(m.name for m in request.node.iter_markers() if m.name in TIERS)

    def refuse(what, needs):
        def refused(*args, **kwargs):
            raise AssertionError(f"a {tier} test {what}: mark it @pytest.mark.{needs}")
        return refused
    if tier == "pure":
        from ns_kernel import syscalls
        monkeypatch.setattr(subprocess.Popen, "_execute_child",
                            refuse("started a process", "privileged"))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "unshare"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, refuse(f"called os.{name}", "privileged"))
        monkeypatch.setattr(syscalls, "unshare", refuse("unshared a namespace", "privileged"))
    elif tier == "privileged":
        from jupyter_client.manager import AsyncKernelManager
        for manager in (KernelManager, AsyncKernelManager):
            monkeypatch.setattr(manager, "start_kernel", refuse("started a kernel", "kernel"))


def write_spec(name, options=(), provisioner=False, config=None, python=None):
    """A kernelspec in the test data dir whose launcher gets `options` (e.g. --home shared).
    Without the provisioner (default) clients take the argv path with its TCP bridge, as
    those that ignore provisioners do; test_provisioner.py covers the provisioner's path,
    whose Sandbox settings can also come from its `config` stanza. python: the launcher's
    interpreter (default: this one)."""
    spec = kernelspec.kernel_dict(list(options), provisioner=provisioner)
    if python:
        spec["argv"][0] = python
    if config:
        spec["metadata"]["kernel_provisioner"]["config"] = config
    kernelspec.write_kernel_spec(os.path.join(_DATA, "kernels", name), spec)
    return name


write_spec(KERNEL_NAME)      # what `ns-kernel install` writes: warm by default
# A cold start with the kernel's interpreter prestarted (prestart.py), argv path.
COLD_NAME = write_spec("isolated-python-cold", ["--cold"])


# Every way a kernel starts, by name: what tests parametrize over to cover them all.
ALL_PATHS = [path.name for path in START_PATHS]


def start_paths(prefix, options=()):
    """A kernelspec for each way a kernel starts (argv.START_PATHS), with options: from the
    warm template (the default) on the argv path with its TCP bridge and on the
    provisioner's direct ipc; cold with a prestarted interpreter (--cold); init exec'ing
    the kernel (--no-prestart)."""
    return {path.name: start_path_spec(f"{prefix}-{path.name}", path.name, options)
            for path in START_PATHS}


def start_path_spec(name, path, options=()):
    """The kernelspec `name` that starts a kernel the way named `path` (ALL_PATHS), with
    options: for a test's own spec on one path."""
    way = next(way for way in START_PATHS if way.name == path)
    return write_spec(name, [*options, *way.options], provisioner=way.provisioner)


def stop_templates(python=sys.executable, under=None, environ=os.environ):
    """Stop every warm template of `python` (or of any interpreter under the dir `under`)
    under the default socket base of a process of `environ` (kernels start warm by
    default; a template outlives its kernels by design, the tests leave none). Those of
    other interpreters are others' (root's tests of another checkout)."""
    import glob
    from ns_kernel import socketdir, warm
    for path in glob.glob(os.path.join(socketdir.default_base(environ), "warm-*.sock")):
        pid = warm.template_pid(path)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                exe = titles.template_python(f.read()) or ""
            ours = exe.startswith(under + "/") if under else exe == python
        except OSError:
            continue
        if ours:
            warm.stop(path)
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")


def pytest_sessionfinish(session, exitstatus):
    for path in (_DATA, _HOME, _TMP):
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.isdir(_BASE):
        return
    # Warm templates outlive their kernels by design (template.IDLE_EXIT): stop the run's own.
    for name in set(os.listdir(_BASE)) - _IN_BASE_BEFORE:
        if name.startswith("warm-") and name.endswith(".sock"):
            warm.stop(os.path.join(_BASE, name))
    if not _BASE_EXISTED:
        wait_until(lambda: os.listdir(_BASE) == [], timeout=5)
        try:
            os.rmdir(_BASE)
        except OSError:
            pass     # a kernel of the user's own started meanwhile: it is theirs now


@pytest.fixture
def workdir():
    """A notebook folder the sandbox's uid can write (nobody, when the tests run as root)."""
    path = tempfile.mkdtemp(prefix="ns-kernel-wd-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Kernel:
    """A real isolated kernel: its manager, a client, and a way to run code in it."""

    def __init__(self, km, kc):
        self.km, self.kc = km, kc

    def execute(self, code, timeout=30, stdin=None):
        """Run code; return (stdout+stderr text, error name or None, all iopub messages)."""
        for _ in range(3):
            result, status = self._execute(code, timeout, stdin)
            # ipykernel aborts requests that reach it while it is still flushing its queue
            # after an error (KeyboardInterrupt included): a plain kernel does the same.
            if status != "aborted":
                return result
            time.sleep(0.2)
        raise AssertionError(f"the kernel aborted {code!r} three times")

    def _execute(self, code, timeout, stdin):
        """jupyter_client's execute_interactive, collecting what a reader would see."""
        out, error, msgs = [], None, []

        def output(msg):
            nonlocal error
            msgs.append(msg)
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                error = msg["content"]["ename"]

        def answer(request):
            msgs.append(request)
            self.kc.input(stdin)
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=output,
                                            allow_stdin=stdin is not None, stdin_hook=answer)
        return ("".join(out), error, msgs), reply["content"]["status"]

    def reply(self, msg_id, timeout=20):
        """The shell reply to msg_id, past any other: jupyter_client's wait_for_ready sends
        kernel_info again each second until one is answered, so a loaded machine leaves
        a late kernel_info_reply queued, with a plain kernel just the same."""
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def value(self, expr, timeout=30):
        """Evaluate expr in the kernel and return its repr() parsed back (literals only)."""
        import ast
        out, error, _ = self.execute(f"print(repr({expr}))", timeout)
        assert error is None, f"{expr} raised {error}: {out}"
        return ast.literal_eval(out.strip())


# For code an attack test runs in a kernel (or a notebook): one line per attempt, the
# attempt's name and ALLOWED, or the exception that stopped it.
ATTEMPT = """def attempt(what, action):
    try:
        action()
        print(what, "ALLOWED")
    except Exception as exc:
        print(what, type(exc).__name__)
"""


def start_kernel(cwd, extra_arguments=(), kernel_name=KERNEL_NAME, env=None, stderr=None, **kw):
    """env: variables to set (e.g. HOME) for the launcher, as a server's would be; stderr:
    a file for the launcher's (the server log's) lines."""
    km = KernelManager(kernel_name=kernel_name, **kw)
    km.start_kernel(cwd=cwd, extra_arguments=list(extra_arguments),
                    **({"env": {**os.environ, **env}} if env else {}),
                    **({"stderr": stderr} if stderr else {}))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
    except Exception as exc:
        kc.stop_channels()
        process = getattr(km.provisioner, "process", None)
        status = process.poll() if process else None
        km.shutdown_kernel(now=True)
        raise RuntimeError(f"{exc} (the launcher's exit status: {status})") from exc
    return Kernel(km, kc)


def stop_kernel(kernel):
    kernel.kc.stop_channels()
    if kernel.km.has_kernel:
        # Graceful, as a client normally does: the launcher cleans up before it exits.
        kernel.km.shutdown_kernel()


def make_wheel(folder, name, version, source, extra=None):
    """A pure-Python wheel with one module and one console script (and extra: more files,
    path -> text)."""
    dist = f"{name}-{version}"
    files = {
        f"{name}.py": source + "\ndef main():\n    print(VERSION)\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
        f"{dist}.dist-info/entry_points.txt": f"[console_scripts]\n{name} = {name}:main\n",
        **(extra or {}),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name_, text in files.items():
            zf.writestr(name_, text)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def kernel(workdir):
    k = start_kernel(workdir)
    yield k
    stop_kernel(k)


@pytest.fixture(scope="module")
def module_kernel():
    """One kernel for those of a module's tests that only run code in it, in its own
    notebook folder. A test that interrupts, restarts, kills or limits its kernel, exhausts
    something in it, or needs a fresh sandbox takes `kernel`."""
    path = tempfile.mkdtemp(prefix="ns-kernel-wd-")
    os.chmod(path, 0o777)
    k = start_kernel(path)
    yield k
    stop_kernel(k)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel_pair(workdir):
    a, b = start_kernel(workdir), start_kernel(workdir)
    yield a, b
    stop_kernel(a)
    stop_kernel(b)


@pytest.fixture(scope="session")
def python():
    return sys.executable


# -- processes and socket dirs: what a kernel leaves behind ----------------------------

def descendants(pid):
    """Host pids of every process below pid (the monitor, init, the kernel, its children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_state(pid):
    """What a process that should have exited is doing: for a failing test's message."""
    facts = []
    for name in ("status", "wchan", "stack", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                text = f.read().decode(errors="replace").replace("\0", " ")
        except OSError as exc:
            text = exc.strerror
        if name == "status":
            text = " ".join(line for line in text.splitlines()
                            if line.startswith(("State", "PPid", "Threads", "SigCgt")))
        facts.append(f"{name}: {text.strip()}")
    return f"pid {pid}: " + "; ".join(facts)


def alive(pids):
    """Those of pids still running (a zombie is dead, merely not yet reaped)."""
    running = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(p)
        except OSError:
            pass
    return running


def _owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def stray_prestarted():
    """Prestarted interpreters (prestart.py; or a kernel grown from one, in the moment
    before it shows its own argv: titles.kernel) whose parent is not a launcher (or init,
    titled ns-kernel-init): every one is a leak, reparented after its launcher died."""
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""
    stray = []
    for entry in os.listdir("/proc"):
        if (entry.isdigit() and _owner(entry) == os.getuid()   # not others' test runs
                and b"from ns_kernel.prestart import main" in cmdline(entry)):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if b"-m\0ns_kernel" not in cmdline(ppid) and cmdline(ppid) != b"ns-kernel-init\0":
                stray.append(int(entry))
    return alive(stray)


def kernel_host_pid(kernel):
    """The host pid of the kernel (PID 2 inside): below its launcher, or (a warm
    template's child) the PID 2 of the PID namespace the kernel says it is in."""
    found = [p for p in descendants(kernel.km.provisioner.process.pid) if _is_kernel(p)]
    if not found:
        return kernel_in_pid_namespace(
            kernel.value("__import__('os').readlink('/proc/self/ns/pid')"))
    assert len(found) == 1, f"kernels found: {found}"
    return found[0]


def kernel_in_pid_namespace(ns):
    """The host pid of the kernel (PID 2) of the PID namespace ns."""
    found = [p for p in in_pid_namespace(ns) if _is_kernel(p)]
    assert len(found) == 1, f"kernels found: {found}"
    return found[0]


def _is_kernel(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
    except OSError:
        return False
    return len(nspid) > 2 and nspid[-1] == "2"


def in_pid_namespace(ns):
    """Host pids of the processes in the PID namespace ns (as /proc/PID/ns/pid reads)
    that this uid may see: an ordinary user may not read init's."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            found += [int(entry)] if os.readlink(f"/proc/{entry}/ns/pid") == ns else []
        except OSError:
            pass
    return found


def parent_pid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def kernel_cgroups(kernel_id):
    """The host dirs of the cgroups the launcher made for kernel_id (limits.enforce names
    them ns-kernel-<id[:8]>-<random>), in any hierarchy."""
    import glob
    found = set()
    for root, _ in cgroup.hierarchies().values():
        for depth in range(4):
            found.update(glob.glob(f"{root}/{'*/' * depth}ns-kernel/ns-kernel-{kernel_id[:8]}-*"))
    return sorted(found)


def sandbox_tree(kernel):
    """Host pids of the kernel's sandbox: monitor, init, the kernel and its children.
    Below the launcher of a cold start; below the warm template for a warm one (the
    monitor is init's parent there)."""
    cold = descendants(kernel.km.provisioner.process.pid)
    if cold:
        return cold
    monitor = parent_pid(parent_pid(kernel_host_pid(kernel)))
    return [monitor, *descendants(monitor)]


# The limits backend this caller gets: the first usable one, as the launcher picks it
# (cgroup v1 as root here, rlimits as an ordinary user).
LIMITS_BACKEND = limits.first_usable(limits.probe())[0]
# How the log and the doctor say a memory limit there (RLIMIT_DATA holds each process).
PER_PROCESS = " per process" if LIMITS_BACKEND == "rlimit" else ""


def kernel_cgroup_dir(kernel, controller):
    """The host directory of the kernel's cgroup for `controller`, from the host's /proc
    (inside, a cgroup namespace shows it as /)."""
    with open(f"/proc/{kernel_host_pid(kernel)}/cgroup") as f:
        lines = f.read().splitlines()
    v2 = LIMITS_BACKEND == "cgroup2"
    path = next(line.split(":", 2)[2] for line in lines
                if line.split(":")[1] == ("" if v2 else controller))
    return cgroup.hierarchies()["cgroup2" if v2 else controller][0] + path


def socket_inodes(pids):
    """The inodes of the sockets these processes hold. Init is not dumpable (sandbox.py):
    an ordinary user may not list its fds, so the root pass alone sees those."""
    found, unreadable = set(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unreadable.append(pid)
            continue
        for fd in fds:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[8:-1])
    assert len(unreadable) <= (0 if os.getuid() == 0 else 1), unreadable
    return found


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def socket_base():
    """A socket base dir of the test's own, so leftovers can be counted exactly."""
    base = tempfile.mkdtemp(prefix="nsk-")
    yield base
    # After a SIGKILLed launcher the monitor removes the socket dir a moment later.
    wait_until(lambda: os.listdir(base) == [], timeout=5)
    leftovers = os.listdir(base)
    shutil.rmtree(base, ignore_errors=True)
    assert leftovers == [], f"socket dirs left behind: {leftovers}"


# -- interrupting a running cell ------------------------------------------------------

def wait_for_output(kernel, text, timeout=20):
    """Block until the running cell has printed `text`: only then is it where the test
    wants to interrupt it (a loaded machine may take a while to get there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kernel.kc.get_iopub_msg(timeout=timeout)
        if msg["msg_type"] == "stream" and text in msg["content"]["text"]:
            return
    raise AssertionError(f"the cell never printed {text!r}")


def interrupt_busy_loop(kernel):
    """Interrupt a `while True: pass` cell once it runs; it must end in KeyboardInterrupt."""
    msg_id = kernel.kc.execute("print('looping', flush=True)\nwhile True: pass")
    wait_for_output(kernel, "looping")
    kernel.km.interrupt_kernel()
    reply = kernel.reply(msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt"


# -- the user's socket base: where a test says, never the real /tmp/ns-kernel-UID ------

@pytest.fixture
def user_base(monkeypatch):
    """Point socketdir.default_base() (and the warm template's socket with it) at a dir of
    the test's own, through $XDG_RUNTIME_DIR, and the private dirs used instead of an
    unsafe one at another ($TMPDIR): (default base, tmpdir). Both are made 0755, so that
    what a test puts in them is what decides who may enter."""
    runtime = tempfile.mkdtemp(prefix="nsk-run-")
    tmpdir = tempfile.mkdtemp(prefix="nsk-tmp-")
    for path in (runtime, tmpdir):
        os.chmod(path, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.setenv("TMPDIR", tmpdir)
    yield os.path.join(runtime, "ns-kernel"), tmpdir
    stop_templates()
    for path in (runtime, tmpdir):
        shutil.rmtree(path, ignore_errors=True)
