"""`ns-kernel doctor`: on this host (a real kernel each way one starts), on a host where
user namespaces are off (a user namespace whose own user.max_user_namespaces is 0: that
sysctl is per user namespace and its root may lower it), and under what a container runtime
does (a seccomp filter, a masked /proc, dropped capabilities, a short id map), made here
with the same means; tests/test_containers.py has the real containers."""
import os
import subprocess
import sys

import pytest

from conftest import LIMITS_BACKEND, PER_PROCESS
from ns_kernel import limits
from ns_kernel.argv import START_PATHS

# Run as a user namespace's root (--map-root-user), the launcher's default socket base would
# be /tmp/ns-kernel-0: host root's name, made by this user. Every doctor and launcher here
# uses a base of the test's own.
pytestmark = pytest.mark.usefixtures("user_base")


def doctor(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-P", "-m", "ns_kernel", "doctor", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.kernel     # its trial kernels start in the doctor's subprocess
def test_doctor_passes_here():
    done = doctor("--memory", "512M", "--pids", "64", "--idmap-folder")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "  ok    user namespaces: " in out
    assert f"  ok    limits backend: {LIMITS_BACKEND}, for the limits configured: memory 512M{PER_PROCESS}, pids 64" \
        in out
    # A real kernel each way one starts, each as a kernel started that way is.
    for path in START_PATHS:
        assert (f"  ok    kernel ({path.name}): {path.how}, pid 2 of 2 processes, /proc proc, "
                "/tmp tmpfs (writable)") in out
    assert "network lo, cgroup /, seccomp mode 2, a link in its folder: Permission denied" in out
    assert "  ok    links: Landlock ABI " in out
    assert "  ok    sandbox syscalls: unshare, mount, umount2, pivot_root, open_tree, " in out
    assert "  ok    fresh proc and sysfs: mountable" in out
    assert "  ok    seccomp: libseccomp.so.2 loads; the default filter denies " in out
    # Root's kernels are shown a folder root owns as theirs: tried on the doctor's own.
    assert ("  ok    root's folders: " in out) == (os.getuid() == 0), out
    assert out.rstrip().endswith("isolated kernels can run here.")


def test_doctor_fails_on_limits_the_backend_cannot_enforce():
    # A backend this host cannot give, forced, fails with the reason the probe gives: cgroup v2
    # where its controllers are bound to v1 or not delegated, cgroup v1 for an ordinary user
    # or where it is not mounted. (rlimits are always there.)
    unusable = [(name, why) for name, usable, why in limits.probe() if not usable]
    if not unusable:
        pytest.skip("every limits backend is usable here: none to force")
    name, why = unusable[0]
    done = doctor("--limits", name, "--memory", "1G")
    assert done.returncode == 1
    assert f"ns-kernel: limits backend {name} ({why})" in done.stderr
    assert f"  FAIL  limits backend: {name}" in done.stdout


def test_doctor_names_the_sysctl_when_user_namespaces_are_off():
    done = doctor(prefix=["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"])
    assert done.returncode == 1
    assert "user.max_user_namespaces=0" in done.stdout
    line = ("ns-kernel: unshare(CLONE_NEWUSER): No space left on device (user namespaces are "
            "disabled: sysctl -w user.max_user_namespaces=15000)")
    assert f"  FAIL  user namespaces: {line}" in done.stdout
    assert done.stderr.splitlines()[0] == line
    assert "  --    kernels: none started: fix the above first" in done.stdout


# What a container runtime does, done to the doctor here: it names the cause and the
# runtime's setting (docs/containers.md), and starts no kernel.
def test_doctor_names_the_container_seccomp_profile():
    from test_prestart import denying
    done = doctor(prefix=denying("sethostname", "pivot_root"))
    assert done.returncode == 1
    assert "  FAIL  sandbox syscalls: denied: pivot_root, sethostname" in done.stdout
    assert done.stderr.startswith(
        "ns-kernel: a seccomp filter (the container's) denies pivot_root, sethostname; run the "
        "container with ns_kernel's seccomp profile ")
    assert "container-seccomp.json: `docker run --security-opt seccomp=FILE`" in done.stderr
    assert "seccompProfile: {type: Localhost, localhostProfile: FILE}" in done.stderr
    assert "  --    kernels: none started: fix the above first" in done.stdout


def test_doctor_names_a_seccomp_filter_that_denies_user_namespaces():
    from test_prestart import denying
    done = doctor(prefix=denying("unshare"))
    assert done.returncode == 1
    assert done.stderr.startswith(
        "ns-kernel: unshare(CLONE_NEWUSER): Operation not permitted (a seccomp filter (the "
        "container's) denies unshare; run the container with ns_kernel's seccomp profile ")


def test_doctor_names_masked_proc():
    # A file of /proc mounted over, as Docker's masked paths are: no fresh proc may then be
    # mounted (it would show what the mask hides).
    done = doctor(prefix=["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          'mount --bind /dev/null /proc/version && exec "$@"', "sh"])
    assert done.returncode == 1
    assert "  FAIL  fresh proc and sysfs: refused (/proc/version)" in done.stdout
    assert ("ns-kernel: a fresh proc mount is refused: the container runtime masks parts of "
            "/proc and /sys (/proc/version mounted over); unmask them: `docker run "
            "--security-opt systempaths=unconfined`, `podman run --security-opt unmask=ALL`; "
            "Kubernetes: securityContext.procMount: Unmasked") in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only host root can drop its capabilities")
def test_doctor_names_roots_capabilities():
    done = doctor(prefix=["setpriv", "--inh-caps=-chown,-setuid", "--bounding-set=-chown,-setuid"])
    assert done.returncode == 1
    assert "  FAIL  root's kernels: run as uid 65534; capabilities lacking CAP_CHOWN, " \
        "CAP_SETUID" in done.stdout
    assert ("this root lacks CAP_CHOWN, CAP_SETUID (a container with --cap-drop ALL?): "
            "`docker run --cap-add CHOWN --cap-add SETUID --cap-add SETGID`") in done.stderr


@pytest.mark.kernel      # the doctor's trial kernels start
@pytest.mark.skipif(os.geteuid() != 0, reason="only host root can drop its capabilities")
def test_doctor_explains_an_exec_instead_of_the_prestart():
    done = doctor(prefix=["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  ok    kernel (cold): exec, pid 2 of 2 processes" in done.stdout
    assert ("  info  prestart: kernels are exec'd instead (root without CAP_SYS_PTRACE (a "
            "container's default) may not join") in done.stdout


@pytest.mark.kernel      # the doctor's trial kernels start
@pytest.mark.skipif(os.geteuid() != 0, reason="only host root can drop its capabilities")
def test_roots_kernels_need_no_capability_over_files():
    # Root's kernels run as nobody, in a socket dir root keeps its own (socketdir.create):
    # a container's root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER starts
    # them every way, as the docs say (CHOWN, SETUID, SETGID are all it needs).
    dropped = "-dac_override,-dac_read_search,-fowner"
    done = doctor(prefix=["setpriv", f"--inh-caps={dropped}", f"--bounding-set={dropped}"])
    assert done.returncode == 0, done.stdout + done.stderr
    for how, started in (("provisioner", "warm"), ("argv", "warm"), ("cold", "prestarted")):
        assert f"  ok    kernel ({how}): {started}, pid 2 of 2 processes" in done.stdout


# The launcher's own line for the same causes (the server log's), when root gives its
# kernel's socket dir to nobody's group: which capability is missing, or which map lacks it.
LAUNCHER_HINTS = {
    "no CAP_CHOWN": (["setpriv", "--inh-caps=-chown", "--bounding-set=-chown"],
                     "Operation not permitted (root's kernels run as another uid, but this "
                     "root lacks CAP_CHOWN (a container with --cap-drop ALL?): `docker run "
                     "--cap-add CHOWN --cap-add SETUID --cap-add SETGID`"),
    "a map without 65534": (["unshare", "--user", "--map-root-user"],
                            "Invalid argument (gid 65534 has no mapping in this user namespace "
                            "(gids 0-0: a container's map?): pick a mapped uid (--uid 1000 "
                            "--gid 1000) or give the container a map of 65536 ids"),
}


@pytest.mark.parametrize("cause", LAUNCHER_HINTS)
def test_launcher_names_why_root_cannot_give_nobody_its_dirs(cause, tmp_path):
    prefix, hint = LAUNCHER_HINTS[cause]
    if cause == "no CAP_CHOWN" and os.geteuid() != 0:
        pytest.skip("only host root can drop its capabilities")
    os.chmod(tmp_path, 0o777)
    done = subprocess.run([*prefix, sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                           "/bin/true"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("ns-kernel: chown :65534 ") and hint in line, line
