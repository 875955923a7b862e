"""Defense in depth (issue 10): the final state of the kernel process is the same on every
way a kernel starts, and each attack made from a kernel on an earlier main fails."""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import LIMITS_BACKEND, kernel_cgroup_dir, kernel_host_pid, start_kernel, \
    start_paths, stop_kernel, wait_until, write_spec
from ns_kernel import cgroup, container, seccomp
from ns_kernel.limits import DEFAULT_PIDS

PATHS = start_paths("defense")
NO_FILTER = write_spec("defense-no-seccomp", ["--seccomp=off"])
CAP_SYS_ADMIN = 21

STATE = r"""
import os, subprocess, ctypes
fields = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
print("Seccomp", fields["Seccomp"].strip())
print("NoNewPrivs", fields["NoNewPrivs"].strip())
print("CapEff", fields["CapEff"].strip())
print("oom_score_adj", open("/proc/self/oom_score_adj").read().strip())
print("init", open("/proc/1/cmdline", "rb").read())
print("nproc", __import__("resource").getrlimit(__import__("resource").RLIMIT_NPROC))
print("cgroup", sorted({l.split(":", 2)[2] for l in open("/proc/self/cgroup").read().splitlines()}))
print("max_user_namespaces", open("/proc/sys/user/max_user_namespaces").read().strip())
print("unshare", subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode)
libc = ctypes.CDLL(None, use_errno=True)
for name in ("keyctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
             "open_by_handle_at", "kexec_load", "mount", "setns"):
    nr = {"keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
          "io_uring_setup": 425, "open_by_handle_at": 304, "kexec_load": 246, "mount": 165,
          "setns": 308}[name]
    ctypes.set_errno(0)
    libc.syscall(nr, 0, 0, 0, 0, 0)
    print(name, os.strerror(ctypes.get_errno()).replace(" ", "_"))
"""
DENIED = ("keyctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
          "open_by_handle_at", "kexec_load", "mount", "setns")


@pytest.fixture(scope="module")
def host_key():
    """A key in the test's own session keyring, as a Jupyter server may hold one (its
    kernels inherited the server's keyring before)."""
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(248, b"user", b"ns-kernel-test-key", b"secret", 6, -3)  # add_key, @s
    assert serial > 0, os.strerror(ctypes.get_errno())
    yield serial
    libc.syscall(250, 3, serial)   # KEYCTL_REVOKE


@pytest.fixture(scope="module", params=list(PATHS))
def path_kernel(request, host_key):
    """A kernel of each start path (started once host_key is in the keyring it must not
    inherit), shared by the tests that only look at it: its state, its filter."""
    wd = tempfile.mkdtemp(prefix="ns-kernel-wd-")
    os.chmod(wd, 0o777)
    k = start_kernel(wd, kernel_name=PATHS[request.param])
    yield k
    stop_kernel(k)
    shutil.rmtree(wd, ignore_errors=True)


def state(out):
    return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_final_state_is_the_same_on_every_path(path_kernel):
    k = path_kernel
    out, error, _ = k.execute(STATE, timeout=60)
    assert error is None, out
    # numpy, threads, multiprocessing still work under the filter (and everyday.ipynb
    # runs pty, subprocess, matplotlib, widgets, the debugger under it too).
    out2, error, _ = k.execute(
        "import numpy, multiprocessing, threading\n"
        "with multiprocessing.Pool(2) as p: print(p.map(abs, [-1, -2]))\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(int(numpy.arange(10).sum()))", timeout=60)
    assert (error, out2) == (None, "[1, 2]\nthread\n45\n")
    seen = state(out)
    seen["pids"] = pids_limit(k, seen)
    assert_sealed(seen, out)


@pytest.mark.skipif(not container.has_capability(CAP_SYS_ADMIN) or container.seccomp_filtered(),
                    reason="reading a filter needs CAP_SYS_ADMIN and no filter of one's own: "
                    "root's pass outside a container")
def test_the_filter_is_libseccomps_program_on_every_path(path_kernel):
    # Warm (a fork of the template), prestarted (joined the sandbox) or exec'd: exactly
    # one filter, and it is the program libseccomp makes of the default filter.
    pid = kernel_host_pid(path_kernel)
    with open(f"/proc/{pid}/status") as f:
        assert "Seccomp_filters:\t1\n" in f.read()
    assert loaded_filter(pid) == seccomp.program(seccomp.default_filter())


def loaded_filter(pid):
    """The classic BPF program of the newest seccomp filter (index 0) of process pid
    (ptrace's PTRACE_SECCOMP_GET_FILTER on a tracee stopped for the moment)."""
    seize, interrupt, detach, get_filter, wall = 0x4206, 0x4207, 17, 0x420c, 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    assert libc.ptrace(seize, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.ptrace(interrupt, pid, None, None) == 0, os.strerror(ctypes.get_errno())
        os.waitpid(pid, wall)
        count = libc.ptrace(get_filter, pid, None, None)
        assert count > 0, os.strerror(ctypes.get_errno())
        program = ctypes.create_string_buffer(count * 8)
        assert libc.ptrace(get_filter, pid, None, program) == count
        return program.raw
    finally:
        libc.ptrace(detach, pid, None, None)


def pids_limit(k, seen):
    """The kernel's pids limit on this caller's backend, as a string."""
    if LIMITS_BACKEND == "rlimit":
        soft, hard = eval(seen["nproc"])
        assert soft == hard
        return str(soft)
    return cgroup.read(f"{kernel_cgroup_dir(k, 'pids')}/pids.max")


def assert_sealed(seen, out):
    assert seen["Seccomp"] == "2" and seen["NoNewPrivs"] == "1"
    assert seen["CapEff"] == "0000000000000000"
    assert seen["oom_score_adj"] == "500"            # the host's OOM killer takes it first
    assert seen["cgroup"] == "['/']"                # its own cgroup namespace
    assert seen["max_user_namespaces"] == "0" and seen["unshare"] != "0"
    for name in DENIED:
        assert seen[name] == "Operation_not_permitted", (name, out)
    # Init's command line was the launcher's, with the host's paths in it.
    assert seen["init"] == repr(b"ns-kernel-init\0")
    # A fork bomb is held without any --pids (test_limits: one held for real).
    assert seen["pids"] == str(DEFAULT_PIDS), out


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_ns_kernel_run_is_sealed_the_same_way(host_key, workdir):
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                           sys.executable, "-c", STATE], cwd=workdir, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = state(done.stdout)
    assert (seen["Seccomp"], seen["NoNewPrivs"], seen["CapEff"]) == ("2", "1", "0000000000000000")
    assert seen["max_user_namespaces"] == "0"
    assert seen["bpf"] == "Operation_not_permitted"
    assert seen["init"] == repr(b"ns-kernel-init\0")


def test_not_the_servers_keyring(host_key, workdir):
    # keyctl is denied by the filter; without it the kernel still has a keyring of its own.
    ours = ctypes.CDLL(None).syscall(250, 0, -3, 0)
    k = start_kernel(workdir, kernel_name=NO_FILTER)
    try:
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING)
        theirs = k.value("__import__('ctypes').CDLL(None).syscall(250, 0, -3, 0)")
        visible = k.value("'ns-kernel-test-key' in open('/proc/keys').read()")
    finally:
        stop_kernel(k)
    assert theirs > 0 and theirs != ours
    if os.getuid() == 0:
        assert visible is False   # root's key, and the kernel (nobody) no longer holds it
    else:
        # The user's own key stays viewable by its uid (key permissions), not possessed.
        assert visible is True


def test_seccomp_off_says_so(workdir, tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=NO_FILTER, stderr=stderr)
        try:
            assert "Seccomp:\t0" in k.value("open('/proc/self/status').read()")
        finally:
            stop_kernel(k)
    assert ": no seccomp filter (Sandbox.seccomp = off)" in log.read_text()


# Allows all but two things a kernel's startup never does, one of them by an argument.
SMALL_PROFILE = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["sched_setaffinity"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
    {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
     "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}]}]}      # AF_INET6
UNDER_SMALL_PROFILE = r"""
import os, socket
for name, call in (("affinity", lambda: os.sched_setaffinity(0, {0})),
                   ("inet6", lambda: socket.socket(socket.AF_INET6).close()),
                   ("inet", lambda: socket.socket(socket.AF_INET).close())):
    try:
        call()
        print(name, "ok")
    except OSError as exc:
        print(name, exc.errno)
print("Seccomp", open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
"""


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """A small profile, and Docker's own default (moby's profiles/seccomp/default.json)."""
    import json
    import shutil
    folder = tmp_path_factory.mktemp("profiles")
    small = folder / "small.json"
    small.write_text(json.dumps(SMALL_PROFILE))
    docker = folder / "docker.json"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "docker-default-seccomp.json"),
                docker)
    for path in (small, docker):
        path.chmod(0o644)
    return {"small": str(small), "docker": str(docker)}


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_a_docker_or_oci_profile_file_is_the_filter(profiles, workdir, path):
    if path == "run":
        done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--seccomp",
                               profiles["small"], "--", sys.executable, "-c",
                               UNDER_SMALL_PROFILE], cwd=workdir, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert f"seccomp profile {profiles['small']}" in done.stderr     # said in the log
    else:
        k = start_kernel(workdir, kernel_name=start_paths("profile", [
            "--seccomp", profiles["small"]])[path])
        try:
            out, error, _ = k.execute(UNDER_SMALL_PROFILE)
            assert error is None, out
        finally:
            stop_kernel(k)
    assert out == "affinity 95\ninet6 97\ninet ok\nSeccomp 2\n"


def test_a_notebook_runs_under_dockers_default_profile(profiles, workdir):
    k = start_kernel(workdir, kernel_name=write_spec(
        "profile-docker", ["--seccomp", profiles["docker"]], provisioner=True))
    try:
        out, error, _ = k.execute(
            "import numpy, multiprocessing, threading, subprocess, pty, ctypes, os\n"
            "with multiprocessing.Pool(2) as p: print(p.map(abs, [-1, -2]))\n"
            "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "print(int(numpy.arange(10).sum()), subprocess.run(['true']).returncode)\n"
            "m, s = pty.openpty(); os.write(s, b'x'); print(os.read(m, 1))\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.syscall(250, 0, 0, 0, 0, 0), ctypes.get_errno())  # keyctl", timeout=60)
    finally:
        stop_kernel(k)
    assert (error, out) == (None, "[1, 2]\nthread\n45 0\nb'x'\n-1 1\n")


@pytest.mark.parametrize("path", PATHS)
def test_the_kernel_has_none_of_the_servers_fds(workdir, tmp_path, path):
    """On a terminal the kernel read what the user typed and rewrote the screen; on a log
    file it read the server's token. It gets /dev/null and a pipe to the log instead, its
    lines marked as its own and without terminal escapes."""
    from jupyter_client.manager import KernelManager
    from conftest import Kernel
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        stderr.write("token=SERVER-SECRET\n")
        stderr.flush()
        km = KernelManager(kernel_name=PATHS[path])
        km.start_kernel(cwd=workdir, stderr=stderr, stdout=stderr)
        k = Kernel(km, km.client())
        k.kc.start_channels()
        try:
            k.kc.wait_for_ready(timeout=60)
            inode = os.fstat(stderr.fileno()).st_ino
            held = k.value(f"[fd for fd in map(int, __import__('os').listdir('/proc/self/fd')) "
                           f"if __import__('os').path.exists(f'/proc/self/fd/{{fd}}') and "
                           f"__import__('os').stat(f'/proc/self/fd/{{fd}}').st_ino == {inode}]")
            assert held == []
            assert k.value("open('/proc/self/fd/0', 'rb').read()") == b""     # /dev/null
            k.execute("import os; os.write(2, b'ns-kernel: kernel 0 killed: out of memory"
                      "\\x1b]0;pwned\\x07\\n')")
        finally:
            stop_kernel(k)
    text = log.read_text()
    assert "\x1b" not in text and "\x07" not in text
    forged = [line for line in text.splitlines() if "killed: out of memory" in line]
    assert len(forged) == 1 and forged[0].startswith("[kernel "), forged


# getpid by another ABI's number: x32's (0x40000000 | 39) and i386's (int 0x80, eax 20),
# from the cell's own thread and from a thread of its own, the thread first: each is
# (return value, errno) or what became of the thread.
OTHER_ABI = r"""
import ctypes, mmap, threading
libc = ctypes.CDLL(None, use_errno=True)
def x32():
    ctypes.set_errno(0)
    return libc.syscall(0x40000000 | 39), ctypes.get_errno()
code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(bytes.fromhex("b814000000cd80c3"))       # mov eax, 20; int 0x80; ret
int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
def i386():
    return int80(), None
def in_thread(call):
    done = []
    thread = threading.Thread(target=lambda: done.append(call()))
    thread.start()
    thread.join(20)
    return done[0] if done else "its thread is gone"
print(in_thread(x32), in_thread(i386), flush=True)
print(x32(), i386(), flush=True)
"""
ENOSYS_ALL = "(-1, 38) (-38, None)\n(-1, 38) (-38, None)\n"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x32 and i386 are x86_64's")
@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_a_syscall_of_another_abi_fails_and_the_kernel_lives(workdir, path):
    # Attack (issue 22, item 6): the filter's rules name x86_64's numbers; a call by x32's
    # or i386's met libseccomp's default for another ABI, SCMP_ACT_KILL, which kills the
    # calling thread only: the kernel's heartbeat still answered, its shell never did, and
    # the restarted kernel was told "killed by SIGKILL" (the restarter's). Now ENOSYS, as
    # on a Linux without x32; the kernel answers after it.
    if path == "run":
        done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                               sys.executable, "-c", OTHER_ABI], cwd=workdir,
                              capture_output=True, text=True, timeout=90)
        assert (done.returncode, done.stdout) == (0, ENOSYS_ALL), done.stderr
        return
    k = start_kernel(workdir, kernel_name=PATHS[path])
    try:
        out, error, _ = k.execute(OTHER_ABI, timeout=60)
        assert (error, out) == (None, ENOSYS_ALL)
        assert k.value("1 + 1") == 2
    finally:
        stop_kernel(k)


# A profile whose rule kills a thread (SCMP_ACT_KILL in older profiles, KILL_THREAD).
KILLING_PROFILE = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["kcmp"], "action": "SCMP_ACT_KILL"},
    {"names": ["lookup_dcookie"], "action": "SCMP_ACT_KILL_THREAD"}]}
KCMP_IN_A_THREAD = ("import ctypes, threading\n"
                    "t = threading.Thread(target=ctypes.CDLL(None).syscall, args=({nr}, 0, 0, 0, "
                    "0, 0))\nt.start(); t.join(); print('alive')")
SIGSYS_SAID = "killed by SIGSYS (a system call its seccomp filter forbids)"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
@pytest.mark.parametrize("path", ["argv", "provisioner", "run"])
def test_a_profile_s_kill_ends_the_whole_kernel_and_says_so(workdir, tmp_path, path):
    # A killed thread left a kernel that looked alive and never answered: a profile's kill
    # ends the whole process, and the launcher says it was the filter.
    import json
    profile = tmp_path / "killing.json"
    profile.write_text(json.dumps(KILLING_PROFILE))
    profile.chmod(0o644)
    if path == "run":
        for nr in (312, 212):       # kcmp, lookup_dcookie
            done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--seccomp",
                                   str(profile), "--", sys.executable, "-c",
                                   KCMP_IN_A_THREAD.format(nr=nr)], cwd=workdir,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and done.stdout == "", (done.stdout, done.stderr)
            assert f"ns-kernel: command {SIGSYS_SAID}" in done.stderr, done.stderr
        return
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=start_paths("killing", [
            "--seccomp", str(profile)])[path], stderr=stderr)
        try:
            k.kc.execute(KCMP_IN_A_THREAD.format(nr=312))
            assert wait_until(lambda: not k.km.is_alive(), timeout=30), \
                "a kernel that looks alive"
        finally:
            stop_kernel(k)
    said = [line for line in log.read_text().splitlines() if SIGSYS_SAID in line]
    assert len(said) == 1 and said[0].startswith("ns-kernel: kernel "), log.read_text()


# -- what a kernel could take from the host ------------------------------------------------
# Per-uid budgets (pending signals, POSIX message queue bytes, inotify watches) are counted
# by Linux in every user namespace up the chain: what a kernel holds is also charged to the
# uid that owns its user namespace on the host (the user; root, for a root-run server).
# A kernel gets a share of each, cannot fill the server log, write the host's socket dir
# or reach the host's abstract sockets.

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
    while n < 256 and libc.mq_open(b"/ns-kernel-hog-%d" % n, os.O_CREAT | os.O_RDWR, 0o600,
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
    name = f"/ns-kernel-host-{os.getpid()}".encode()
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


MEMORY = write_spec("defense-memory", ["--memory", "256M"])
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
    name = f"\0ns-kernel-host-{os.getpid()}"
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
