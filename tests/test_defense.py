"""Defense in depth (issue 10): the final state of the kernel process is the same on every
way a kernel starts, and each attack made from a kernel on an earlier main fails."""
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import LIMITS_BACKEND, kernel_cgroup_dir, kernel_host_pid, start_kernel, start_paths, \
    stop_kernel, wait_until, write_spec
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
