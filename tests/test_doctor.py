"""`ns-kernel doctor`: on this host (a real trial sandbox), and on a host where user
namespaces are off (a user namespace whose own user.max_user_namespaces is 0: that
sysctl is per user namespace and its root may lower it)."""
import subprocess
import sys

from conftest import LIMITS_BACKEND
from ns_kernel import limits



def doctor(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-P", "-m", "ns_kernel", "doctor", *args],
                          capture_output=True, text=True, timeout=120)


def test_doctor_passes_here():
    done = doctor("--memory", "512M", "--pids", "64")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "  ok    user namespaces: " in out
    assert f"  ok    limits backend: {LIMITS_BACKEND}, for the limits configured: memory 512M, pids 64" \
        in out
    assert "  ok    trial sandbox: pid 2 of 2 processes, /proc proc, /tmp tmpfs (writable)" in out
    assert "network lo, ipykernel importable, seccomp mode 2" in out
    assert "  ok    seccomp: libseccomp.so.2 loads; the default filter denies " in out
    assert out.rstrip().endswith("isolated kernels can run here.")


def test_doctor_fails_on_limits_the_backend_cannot_enforce():
    # cgroup v2 has none of memory/pids/cpu on this host (all bound to v1): forcing it fails.
    cgroup2 = next(o for o in limits.probe() if o[0] == "cgroup2")
    assert not cgroup2[1], "this test expects a host without a usable cgroup v2"
    done = doctor("--limits", "cgroup2", "--memory", "1G")
    assert done.returncode == 1
    assert f"ns-kernel: limits backend cgroup2 ({cgroup2[2]})" in done.stderr
    assert "  FAIL  limits backend: cgroup2" in done.stdout


def test_doctor_names_the_sysctl_when_user_namespaces_are_off():
    done = doctor(prefix=["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"])
    assert done.returncode == 1
    assert "user.max_user_namespaces=0" in done.stdout
    line = ("ns-kernel: unshare(CLONE_NEWUSER): No space left on device (user namespaces are "
            "disabled: sysctl -w user.max_user_namespaces=15000)")
    assert f"  FAIL  user namespaces: {line}" in done.stdout
    assert done.stderr.splitlines()[0] == line
    assert "trial sandbox" not in done.stdout
