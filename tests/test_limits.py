"""Limits enforced for real: a memory hog, a (bounded) fork bomb and a CPU spinner run in
real kernels, under whichever backend this host gives the caller (cgroup v1 as root here,
rlimits as an ordinary user). Every hog checks first that its limit is in force, and is
bounded, so a limit that failed to apply cannot take the machine down."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from conftest import LIMITS_BACKEND, PER_PROCESS, kernel_cgroup_dir, start_kernel, stop_kernel
from ns_kernel import cgroup, limits, notice
from ns_kernel.launcher import kernel_id_from

LIMITED = "isolated-python-512m"
OPTIONS = ["--memory", "512M", "--pids", "64"]
MiB = 1 << 20


def ns_kernel(*args, cwd=None):
    return subprocess.run([sys.executable, "-P", "-m", "ns_kernel", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def specs():
    """Two specs installed by `ns-kernel install` beside the default one, different limits."""
    prefix = tempfile.mkdtemp(prefix="ns-kernel-specs-")
    os.chmod(prefix, 0o755)
    for name, display, options in ((LIMITED, "Isolated Python (512 MB)", OPTIONS),
                                   ("isolated-python-2g", "Isolated Python (2 GB)",
                                    ["--memory", "2G", "--cpus", "0.5", "--best-effort"])):
        done = ns_kernel("install", "--prefix", prefix, "--name", name,
                         "--display-name", display, *options)
        assert done.returncode == 0, done.stderr
    data = os.path.join(prefix, "share", "jupyter")
    old = os.environ["JUPYTER_PATH"]
    os.environ["JUPYTER_PATH"] = os.pathsep.join([old, data])
    yield data
    os.environ["JUPYTER_PATH"] = old
    import shutil
    shutil.rmtree(prefix, ignore_errors=True)


def assert_memory_limit_in_force(kernel):
    if LIMITS_BACKEND == "rlimit":
        assert kernel.value("__import__('resource').getrlimit(__import__('resource')"
                            ".RLIMIT_DATA)") == (512 * MiB, 512 * MiB)
    else:
        d = kernel_cgroup_dir(kernel, "memory")
        name = "memory.max" if LIMITS_BACKEND == "cgroup2" else "memory.limit_in_bytes"
        assert cgroup.read(f"{d}/{name}") == str(512 * MiB)


def test_backend_for_this_caller():
    """The tests below adapt to the backend; this pins it, so a broken cgroup probe cannot turn
    root's tests into rlimit tests: root gets cgroups, an ordinary user (no delegated
    subtree configured) rlimits."""
    assert LIMITS_BACKEND in (("cgroup1", "cgroup2") if os.getuid() == 0 else ("rlimit",))


def test_install_writes_limits_and_specs_coexist(specs):
    from jupyter_client.kernelspec import KernelSpecManager
    found = KernelSpecManager().get_all_specs()
    assert {"isolated-python", LIMITED, "isolated-python-2g"} <= set(found)
    small, big = found[LIMITED]["spec"], found["isolated-python-2g"]["spec"]
    assert small["display_name"] == "Isolated Python (512 MB)"
    assert big["display_name"] == "Isolated Python (2 GB)"
    # Install's own options (--prefix P, --name N, --display-name D) stay out of argv.
    # Each name keeps its own home and packages (Sandbox.kernel_name).
    assert small["argv"][4:] == [*OPTIONS, f"--Sandbox.kernel_name={LIMITED}", "-f",
                                 "{connection_file}"]
    assert big["argv"][4:] == ["--memory", "2G", "--cpus", "0.5", "--best-effort",
                               "--Sandbox.kernel_name=isolated-python-2g", "-f",
                               "{connection_file}"]


@pytest.mark.privileged
def test_install_writes_sandbox_options(tmp_path):
    options = ["--home", "readonly", "--ro-bind", "/srv/data", "--rw-bind", "/srv/scratch",
               "--network", "none", "--tmp-size", "256M", "--cpus", "1.5"]
    done = ns_kernel("install", "--prefix", str(tmp_path), "--name", "opts", *options)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "share" / "jupyter" / "kernels" / "opts" / "kernel.json") as f:
        argv = json.load(f)["argv"]
    assert argv[1:4] == ["-P", "-m", "ns_kernel"]
    assert argv[4:] == [*options, "--Sandbox.kernel_name=opts", "-f", "{connection_file}"]


@pytest.mark.privileged
def test_install_rejects_a_bad_limit(tmp_path):
    done = ns_kernel("install", "--prefix", str(tmp_path), "--memory", "lots")
    assert done.returncode != 0
    assert "ns-kernel: " in done.stderr and "not a size: 'lots'" in done.stderr
    assert not (tmp_path / "share").exists()


@pytest.mark.privileged
def test_help_all_documents_every_option():
    from ns_kernel.config import Sandbox
    text = ns_kernel("--help-all").stdout
    for name in Sandbox.class_own_traits(config=True):
        assert f"--Sandbox.{name}=" in text, name
    for alias in ("--memory", "--pids", "--cpus", "--tmp-size", "--home", "--ro-bind",
                  "--rw-bind", "--network", "--best-effort", "--cgroup-parent"):
        assert alias in text, alias


def test_memory_hog_fails_only_its_kernel(specs, workdir):
    hog, other = start_kernel(workdir, kernel_name=LIMITED), start_kernel(workdir)
    try:
        assert_memory_limit_in_force(hog)
        if LIMITS_BACKEND == "rlimit":
            # RLIMIT_DATA: the allocation fails, the kernel lives on.
            _, error, _ = hog.execute("x = bytearray(8 << 30)")
            assert error == "MemoryError"
            assert hog.value("len(bytearray(64 << 20))") == 64 << 20
        else:
            # The cgroup's OOM killer ends this kernel, and only it.
            hog.kc.execute("x = bytearray(8 << 30)")
            for _ in range(300):
                if not hog.km.is_alive():
                    break
                time.sleep(0.1)
            # The launcher leaves the way its kernel left: SIGKILL, from the OOM killer.
            assert hog.km.provisioner.process.returncode == -9
            # The reason waits in the connection file for a restart (none comes here).
            with open(hog.km.connection_file) as f:
                assert "killed: out of memory" in json.load(f)[notice.NOTICE_KEY]
        assert other.value("sum(range(10))") == 45
    finally:
        stop_kernel(hog)
        stop_kernel(other)


def test_run_says_out_of_memory(workdir):
    """The same reason line, for `ns-kernel run` (a command, not a kernel)."""
    done = ns_kernel("run", "--memory", "256M", "--", sys.executable, "-c",
                     "import resource; print(resource.getrlimit(resource.RLIMIT_DATA)[0]); "
                     "x = bytearray(8 << 30)", cwd=workdir)
    assert f"ns-kernel: command limits: memory 256M{PER_PROCESS}, pids {limits.DEFAULT_PIDS} (by {LIMITS_BACKEND})" \
        in done.stderr
    if LIMITS_BACKEND == "rlimit":
        assert done.stdout.strip() == str(256 * MiB)
        assert done.returncode == 1 and "MemoryError" in done.stderr
    else:
        assert done.returncode == -9   # `run` leaves the way the command left
        assert "ns-kernel: command killed: out of memory (limit 256 MiB, peak " in done.stderr


def test_tmp_size_caps_tmp_and_shm(workdir):
    """Every backend: the private tmpfs mounts are size-capped (writes at most 32 MiB each)."""
    done = ns_kernel("run", "--tmp-size", "16M", "--", sys.executable, "-c", """
import errno
for path in ("/tmp/fill", "/dev/shm/fill"):
    try:
        with open(path, "wb") as f:
            for _ in range(32):
                f.write(bytes(1 << 20))
                f.flush()
        print(path, "not capped")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
""", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["/tmp/fill", "ENOSPC", "/dev/shm/fill", "ENOSPC"]


def test_fork_bomb_is_held_by_the_pids_limit(specs, workdir):
    k = start_kernel(workdir, kernel_name=LIMITED)
    group = None
    try:
        if LIMITS_BACKEND == "rlimit":
            assert k.value("__import__('resource').getrlimit(__import__('resource')"
                           ".RLIMIT_NPROC)") == (64, 64)
        else:
            group = kernel_cgroup_dir(k, "pids")
            assert cgroup.read(f"{group}/pids.max") == "64"
        # Bounded: at most 200 children, each killed at the end, whatever the limit did.
        out, error, _ = k.execute("""
import os, signal, time
kids, refused = [], 0
for _ in range(200):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(len(kids), refused)
""")
        assert error is None, out
        started, refused = map(int, out.split())
        assert 0 < started < 64 and refused == 200 - started
        assert k.value("6 * 7") == 42
    finally:
        stop_kernel(k)
    if group:
        # shutdown_kernel(now=True) SIGKILLs the launcher: the monitor removes the cgroup.
        for _ in range(50):
            if not os.path.exists(group):
                break
            time.sleep(0.1)
        assert not os.path.exists(group)


def test_a_thread_bomb_is_held_without_any_limit_configured(workdir):
    """The default pids limit (limits.DEFAULT_PIDS), for real: threads, which count like
    processes, until one is refused; bounded above it, in case the limit failed."""
    k = start_kernel(workdir)
    try:
        out, error, _ = k.execute(f"""
import threading
threading.stack_size(256 * 1024)
stop, started = threading.Event(), []
try:
    for _ in range({limits.DEFAULT_PIDS + 200}):
        t = threading.Thread(target=stop.wait)
        t.start()
        started.append(t)
except RuntimeError as exc:
    print("refused", exc)
stop.set()
for t in started:
    t.join()
print(len(started))
""", timeout=120)
        assert error is None, out
        assert "refused can't start new thread" in out
        assert 0 < int(out.split()[-1]) < limits.DEFAULT_PIDS
        assert k.value("6 * 7") == 42
    finally:
        stop_kernel(k)


def test_cpu_share(specs, workdir):
    if LIMITS_BACKEND == "rlimit":
        # RLIMIT_CPU caps seconds, it is no share: refused, unless the admin says best-effort.
        done = ns_kernel("run", "--cpus", "0.5", "--", "/bin/true", cwd=workdir)
        assert done.returncode == 1
        assert "ns-kernel: rlimit cannot enforce cpus" in done.stderr
        assert "--best-effort" in done.stderr
        done = ns_kernel("run", "--cpus", "0.5", "--best-effort", "--", "/bin/true", cwd=workdir)
        assert done.returncode == 0
        assert "ns-kernel: warning: command: cpus not enforced: rlimit cannot" in done.stderr
        return
    k = start_kernel(workdir, kernel_name="isolated-python-2g")
    free = start_kernel(workdir, kernel_name=LIMITED)   # no cpu limit: the yardstick
    try:
        quota = kernel_cgroup_dir(k, "cpu")
        assert (cgroup.read(f"{quota}/cpu.cfs_quota_us") == "50000" if LIMITS_BACKEND == "cgroup1"
                else cgroup.read(f"{quota}/cpu.max") == "50000 100000")
        # Spin for 2 s of wall time (bounded); CPU seconds used per second of wall time.
        spin = ("import time\n"
                "t0, c0 = time.monotonic(), time.process_time()\n"
                "while time.monotonic() < t0 + 2: pass\n"
                "print((time.process_time() - c0) / (time.monotonic() - t0))")
        share, unlimited = float(k.execute(spin)[0]), float(free.execute(spin)[0])
        # Loose bounds: the quota is 0.5 of a core, and the kernel throttled the spinner to
        # it; the unlimited one gets more (how much more depends on the machine's load).
        assert share < 0.7 and unlimited > share, (share, unlimited)
        throttled = limits.cgroup._keyed(cgroup.read(f"{quota}/cpu.stat"))["nr_throttled"]
        assert throttled > 0
    finally:
        stop_kernel(k)
        stop_kernel(free)


def test_death_reason_reaches_log_and_restarted_kernel(specs, workdir, tmp_path):
    """Jupyter's automatic restart: the server log says why, and the new kernel's first
    cell output too."""
    log_path = tmp_path / "server.log"
    killed = LIMITS_BACKEND != "rlimit"
    code = "x = bytearray(8 << 30)" if killed else "import os; os.kill(os.getpid(), 9)"
    reason = ("killed: out of memory (limit 512 MiB, peak " if killed else "killed by SIGKILL")

    async def scenario(log):
        km = AsyncIOLoopKernelManager(kernel_name=LIMITED, config=Config({"KernelRestarter": {
            "time_to_dead": 0.2, "random_ports_until_alive": False}}))
        await km.start_kernel(cwd=workdir, stderr=log)
        restarted = asyncio.Event()
        km.add_restart_callback(restarted.set, "restart")
        km.start_restarter()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            old = km.provisioner.process.pid
            kc.execute(code)
            await asyncio.wait_for(restarted.wait(), 60)

            async def new_launcher():
                # The restart itself runs after the callback: until its new launcher is up,
                # wait_for_ready finds "the kernel" dead.
                while True:
                    process = getattr(km.provisioner, "process", None)
                    if process and process.pid != old and process.poll() is None:
                        return
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(new_launcher(), 60)
            await kc.wait_for_ready(timeout=60)
            msg_id = kc.execute("print('after')")
            out = []
            while True:
                msg = await kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out.append((msg["content"]["name"], msg["content"]["text"]))
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    with open(km.connection_file) as f:
                        assert notice.NOTICE_KEY not in json.load(f)   # shown once only
                    return km.connection_file, out
        finally:
            km.stop_restarter()
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    with open(log_path, "w") as log:
        connection_file, out = asyncio.run(scenario(log))
    # By its id where the connection file's name has one, else by the notebook's folder.
    name = kernel_id_from(connection_file)[:8] or \
        f"{os.path.basename(connection_file)[:-5]} in {workdir}"
    lines = log_path.read_text().splitlines()
    assert any(line.startswith(f"ns-kernel: kernel {name} {reason}") for line in lines), lines
    # Said once, not again at the restart: the same kernel, the same limits.
    assert lines.count(f"ns-kernel: kernel {name} limits: memory 512M{PER_PROCESS}, pids 64 "
                       f"(by {LIMITS_BACKEND})") == 1, lines
    stderr = "".join(text for stream, text in out if stream == "stderr")
    assert stderr.startswith(f"ns-kernel: kernel {name} {reason}"), out
    assert stderr.rstrip().endswith("; this is a new kernel")
    assert out[-1] == ("stdout", "after\n")


def test_no_death_notice_after_a_stop_jupyter_asked_for(workdir):
    """A kernel Jupyter itself terminated (SIGTERM through the launcher) did not die on
    the user: the restarted kernel's first output is the cell's alone."""
    k = start_kernel(workdir)
    try:
        proc = k.km.provisioner.process
        k.km.signal_kernel(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        assert k.execute("print('hello')")[0] == "hello\n"
    finally:
        stop_kernel(k)


def test_a_stop_jupyter_asked_for_is_quiet_after_the_process_limit(specs, workdir, tmp_path):
    """A kernel that once reached its process limit (a fork loop, its children gone) and
    that Jupyter then stops with SIGTERM (a shutdown it did not answer in time) did not die
    of that limit, nor on anyone: the server log says nothing of its end, as a plain
    kernel's does."""
    with open(tmp_path / "server.log", "w") as log:
        k = start_kernel(workdir, kernel_name=LIMITED, stderr=log)
        try:
            out, error, _ = k.execute("""
import os
kids, refused = [], 0
for _ in range(100):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        break
    if pid == 0:
        import time
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(refused)
""")
            assert error is None and out == "1\n", out
            proc = k.km.provisioner.process
            k.km.signal_kernel(signal.SIGTERM)
            assert proc.wait(timeout=20) == -signal.SIGTERM
        finally:
            stop_kernel(k)
    said = (tmp_path / "server.log").read_text()
    assert "limits: " in said            # the log is this kernel's
    assert "killed" not in said and "process limit" not in said, said


@pytest.mark.pure
def test_death_reasons_read_from_the_counters():
    """Pure: the words for each way a kernel ends, from the wait status and the cgroup."""
    from ns_kernel.cgroup import Usage
    from ns_kernel.supervise import describe_exit
    oom = Usage(oom_kills=1, memory_limit=512 * MiB, memory_peak=511 * MiB)
    assert describe_exit(9, "kernel ab12cd34", oom) == \
        "ns-kernel: kernel ab12cd34 killed: out of memory (limit 512 MiB, peak 511 MiB)"
    assert describe_exit(11, "kernel ab12cd34") == "ns-kernel: kernel ab12cd34 killed by SIGSEGV"
    assert describe_exit(31, "kernel ab12cd34") == "ns-kernel: kernel ab12cd34 killed by " \
        "SIGSYS (a system call its seccomp filter forbids)"
    assert describe_exit(1 << 8, "kernel ab12cd34", Usage(pids_limit=64, pids_refused=3)) == \
        "ns-kernel: kernel ab12cd34 exited with status 1 after reaching its process limit (64)"
    assert describe_exit(0, "kernel ab12cd34", Usage(pids_limit=64, pids_refused=3)) is None
