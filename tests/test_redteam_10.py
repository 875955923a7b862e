"""Red team of issue 10 (defense in depth), second pass: what a kernel can still take from
the host. Each test performs the attack from a real kernel on every start path and fails
while it works.

Per-uid budgets (pending signals, POSIX message queue bytes, inotify watches) are counted
by the host's Linux kernel in every user namespace up the chain (ucounts): what a kernel
holds in its sandbox is also charged to the uid that OWNS the sandbox's user namespace on
the host. For an ordinary user that is the user (the server, the desktop, their other
kernels); for a root-run server it is root, although the kernel runs as nobody: one cell
then makes sigqueue(3)/timer_create(2) fail with EAGAIN, mq_open(3) and inotify fail, for
every root process of the machine. The sandbox caps none of them today (user.py caps
inotify instances only, and only per kernel).
"""
import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import LIMITS_BACKEND, start_kernel, start_paths, stop_kernel, write_spec

PATHS = start_paths("redteam10")

# The cell: a child of the kernel takes all it can of each budget and holds it, until the
# test kills the kernel. Prints what it took.
HOG = r"""
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    took = {}
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
    class Value(ctypes.Union):
        _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
    n = 0
    while n < 10**6 and libc.sigqueue(os.getpid(), signal.SIGRTMIN, Value(i=1)) == 0:
        n += 1
    took["signals"] = n
    class Attr(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                    ("msgsize", ctypes.c_long), ("cur", ctypes.c_long), ("pad", ctypes.c_long * 4)]
    libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Attr)]
    n = 0
    while n < 256 and libc.mq_open(b"/redteam-%d" % n, os.O_CREAT | os.O_RDWR, 0o600,
                                   ctypes.byref(Attr(0, 10, 8192, 0))) >= 0:
        n += 1
    took["mqueues"] = n
    dirs = [d for d, _, _ in os.walk("/usr")]
    n = 0
    while True:
        fd = libc.inotify_init1(0)
        if fd < 0:
            break
        for d in dirs:
            if libc.inotify_add_watch(fd, d.encode(), 0x100) < 0:
                break
            n += 1
        else:
            continue
        break
    took["watches"] = n
    os.write(w, repr(took).encode())
    os.close(w)
    time.sleep(600)
    os._exit(0)
os.close(w)
print(os.read(r, 4096).decode())
"""


def host_budgets():
    """Whether this process (the server's uid) can still queue a signal, open a message
    queue, watch a file."""
    libc = ctypes.CDLL(None, use_errno=True)
    seen = {}
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN + 1])

        class Value(ctypes.Union):
            _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
        os._exit(0 if libc.sigqueue(os.getpid(), signal.SIGRTMIN + 1, Value(i=1)) == 0
                 else ctypes.get_errno())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    seen["sigqueue"] = os.strerror(code) if code else "ok"

    class Attr(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                    ("msgsize", ctypes.c_long), ("cur", ctypes.c_long), ("pad", ctypes.c_long * 4)]
    libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Attr)]
    name = f"/redteam-host-{os.getpid()}".encode()
    fd = libc.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(Attr(0, 10, 8192, 0)))
    seen["mq_open"] = "ok" if fd >= 0 else os.strerror(ctypes.get_errno())
    if fd >= 0:
        os.close(fd)
        libc.mq_unlink(name)
    fd = libc.inotify_init1(0)
    if fd < 0:
        seen["inotify"] = os.strerror(ctypes.get_errno())
    else:
        ok = libc.inotify_add_watch(fd, b"/", 0x100) >= 0
        seen["inotify"] = "ok" if ok else os.strerror(ctypes.get_errno())
        os.close(fd)
    return seen


@pytest.mark.parametrize("path", PATHS)
def test_a_kernel_cannot_drain_the_hosts_per_uid_budgets(workdir, path):
    """Attack: a cell queues realtime signals, opens message queues and adds inotify
    watches until each fails. Fix: cap each below the host's (seal: RLIMIT_SIGPENDING,
    RLIMIT_MSGQUEUE; forbid_namespaces: max_inotify_watches next to its instances), and
    for root's sandbox let nobody, not root, own its user namespace."""
    assert host_budgets() == {"sigqueue": "ok", "mq_open": "ok", "inotify": "ok"}
    k = start_kernel(workdir, kernel_name=PATHS[path])
    try:
        took, error, _ = k.execute(HOG, timeout=180)
        assert error is None, took
        seen = host_budgets()
    finally:
        stop_kernel(k)
    assert seen == {"sigqueue": "ok", "mq_open": "ok", "inotify": "ok"}, \
        f"the kernel took {took.strip()}; the host then got {seen}"


def test_ns_kernel_run_cannot_drain_the_hosts_per_uid_budgets(workdir):
    """The same attack from a command of `ns-kernel run`."""
    assert host_budgets() == {"sigqueue": "ok", "mq_open": "ok", "inotify": "ok"}
    code = HOG.replace("print(os.read(r, 4096).decode())",
                       "print(os.read(r, 4096).decode(), flush=True)\ntime.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                             sys.executable, "-c", code], cwd=workdir,
                            stdout=subprocess.PIPE, text=True)
    try:
        took = proc.stdout.readline()
        seen = host_budgets()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert took.startswith("{"), took
    assert seen == {"sigqueue": "ok", "mq_open": "ok", "inotify": "ok"}, \
        f"the command took {took.strip()}; the host then got {seen}"


FLOOD = 32 << 20     # bytes the cell writes
LOGGED = 4 << 20     # what the server log may take of them, at most


@pytest.mark.parametrize("path", PATHS)
def test_a_kernel_cannot_fill_the_server_log(workdir, tmp_path, path):
    """Attack: a cell writes 32 MiB to its original stderr (ipykernel keeps it as
    _original_stdstream_copy; os.write(2, ...) does the same and echoes to the notebook
    too). The relay (output.py) copies all of it into the server's log (a file, the
    journal) with no budget, on the host's disk, and spends the launcher's CPU, which is
    outside the kernel's cgroup and --cpus, on every byte. Fix: a byte budget per kernel
    in Relay, then one line saying how much was left out."""
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=PATHS[path], stderr=stderr)
    try:
        out, error, _ = k.execute(
            "import os, sys\n"
            "fd = sys.stderr._original_stdstream_copy\n"
            f"for _ in range({FLOOD >> 16}):\n"
            "    os.write(fd, (b'x' * 1023 + b'\\n') * 64)\n"
            "print('written')", timeout=180)
        assert (out, error) == ("written\n", None)
    finally:
        stop_kernel(k)
    size = log.stat().st_size
    assert size <= LOGGED, f"the server log took {size >> 20} MiB of the kernel's {FLOOD >> 20}"


MEMORY = write_spec("redteam10-memory", ["--memory", "256M"])
HOLD = r"""
import os, time
held, pipes = 0, []
for _ in range(3):                     # three processes of 100 MB each
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        try:
            block = bytearray(100 << 20)
            block[::4096] = b"x" * len(block[::4096])
            os.write(w, b"1")
        except MemoryError:
            os.write(w, b"0")
        time.sleep(600)
        os._exit(0)
    os.close(w)
    pipes.append(r)
for r in pipes:                        # a child the OOM killer took says nothing (EOF)
    held += 100 * int(os.read(r, 1) or b"0")
try:                                   # and 300 MB of /dev/shm, a tmpfs: no process's
    with open("/dev/shm/blob", "wb") as f:
        for _ in range(300):
            f.write(b"x" * (1 << 20))
    held += 300
except OSError:
    pass
print("held", held, "MB")
"""


def output_or_death(k, code, timeout=60):
    """What the cell printed, or "killed" as soon as the kernel is gone (the cgroup's OOM
    killer took it), instead of waiting out the timeout for a reply that never comes."""
    import queue
    msg_id = k.kc.execute(code)
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not k.km.is_alive():
            return "killed"
        try:
            msg = k.kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)
    raise AssertionError(f"the cell neither ended nor killed its kernel in {timeout} s")


def test_the_memory_limit_holds_for_the_kernel_as_a_whole_or_says_it_does_not(workdir, tmp_path):
    """Attack (rlimit backend: an ordinary user without a delegated cgroup, as here): with
    --memory 256M, a cell held 600 MB: RLIMIT_DATA is per process (three children of 100 MB
    each pass it) and counts no tmpfs page. Under a cgroup the whole holds; under rlimits
    the log line says the limit is per process (docs/limits.md says what it leaves out)."""
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=MEMORY, stderr=stderr)
    try:
        out = output_or_death(k, HOLD)
        alone, _, _ = k.execute("try:\n    x = bytearray(300 << 20)\nexcept MemoryError:\n"
                                "    print('refused')", timeout=60) if out != "killed" else ("", 0, 0)
    finally:
        stop_kernel(k)
    held = int(out.split()[1]) if out.startswith("held") else 0
    if LIMITS_BACKEND == "rlimit":
        assert "limits: memory 256M per process, pids 4096 (by rlimit)" in log.read_text()
        assert alone == "refused\n"
    else:
        assert held <= 256, f"a kernel limited to 256M held {held} MB"


def socket_dir_usage(base):
    total = 0
    for root, _, files in os.walk(base):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def test_ns_kernel_run_cannot_write_the_hosts_socket_dir(workdir, socket_base):
    """Attack: a command of `ns-kernel run` writes 64 MiB into /run/ns-kernel, its socket
    dir, which is a host directory (under /tmp/ns-kernel-UID, or $XDG_RUNTIME_DIR, a tmpfs
    in the host's RAM): no --tmp-size caps it, and only a kernel's socket dir is sealed
    read-only (sandbox.seal_socket_dir: plan.sockets is empty for a command). Fix: no
    socket dir for `ns-kernel run` (nobody connects to it), or mount it read-only."""
    code = ("import sys, time\n"
            "try:\n"
            "    with open('/run/ns-kernel/blob', 'wb') as f:\n"
            "        for _ in range(64): f.write(b'x' * (1 << 20))\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno, flush=True)\n"
            "else:\n"
            "    print('written', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "run",
                             f"--socket-dir={socket_base}", "--", sys.executable, "-c", code],
                            cwd=workdir, stdout=subprocess.PIPE, text=True)
    try:
        said = proc.stdout.readline()
        used = socket_dir_usage(socket_base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert said.startswith("refused") and used < 1 << 20, \
        f"the command said {said.strip()!r}; the host's socket dir held {used >> 20} MiB"


def test_network_host_does_not_open_the_hosts_abstract_sockets(workdir):
    """Attack: with --network host, a command (or kernel) connects to any abstract unix
    socket of the host (X11's @/tmp/.X11-unix/X0: keystrokes into the user's desktop;
    D-Bus, systemd, containerd listen on some), though the README's table says abstract
    sockets are private. Fix: Landlock's LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET (Linux 6.12)
    in the seal, where the host's kernel has it; else say so in the README's table."""
    import socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0ns-kernel-redteam-{os.getpid()}"
    listener.bind(name)
    listener.listen(1)
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "ns_kernel", "run", "--network", "host", "--",
             sys.executable, "-c",
             "import socket\nc = socket.socket(socket.AF_UNIX)\n"
             f"try:\n    c.connect({name!r})\n    print('connected')\n"
             "except OSError as exc:\n    print('refused', exc.errno)"],
            cwd=workdir, capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
    assert done.stdout.startswith("refused"), done.stdout + done.stderr
