"""Kernels in real containers (podman with runc), from a Debian bookworm rootfs built on this
machine (scripts/test-containers: mmdebstrap: python3, libseccomp2, libstdc++6) with this venv bound in
read-only: the settings docs/containers.md recommends run every way a kernel starts, as the
container's root and as an ordinary user; they are also the minimal ones (dropping any one
fails, with the message the docs give); and the doctor names each failure the docs list.

Tier `container`: `scripts/test-containers` (root) installs what it needs and runs it."""
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

from ns_kernel import container
from ns_kernel.argv import EXEC, PRESTARTED, START_PATHS

pytestmark = pytest.mark.container

ROOTFS = os.environ.get("NS_KERNEL_ROOTFS", "/var/cache/ns-kernel/bookworm-rootfs")
VENV = sys.prefix
# The recommended settings (docs/containers.md).
RECOMMENDED = ["--security-opt", f"seccomp={container.PROFILE}", "--security-opt", "unmask=ALL"]
AS_USER = ["--user", "1000:1000", "--env", "HOME=/tmp"]


def podman(*args, command):
    """Run `command` (a shell line) in a fresh container of the rootfs (an overlay: nothing
    is written to it) with this venv, as `ns-kernel` would be in a hub's image."""
    # This machine's root may not raise rlimits (no CAP_SYS_RESOURCE), which podman would
    # do for nofile and nproc; and crun refuses its hybrid cgroup layout, runc does not.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    argv = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", f"nofile={nofile}:{nofile}",
            "--ulimit", f"nproc={nproc}:{nproc}", "-v", f"{VENV}:{VENV}:ro",
            "--env", f"PATH={VENV}/bin:/usr/bin:/bin", *args, "--rootfs", f"{ROOTFS}:O",
            "sh", "-c", f"mkdir -m 777 /tmp/nb && cd /tmp/nb && {command}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module", autouse=True)
def image():
    if not shutil.which("podman") or not os.path.isfile(f"{ROOTFS}/usr/bin/python3"):
        pytest.fail(f"no podman or no rootfs at {ROOTFS}: run scripts/test-containers")
    # The venv's mount point: made by podman, a user-namespaced container's root could not.
    os.makedirs(f"{ROOTFS}{VENV}", exist_ok=True)


WHO = {
    "root": [],
    "user": AS_USER,
    # Kubernetes' allowPrivilegeEscalation: false
    "user without privilege escalation": [*AS_USER, "--security-opt", "no-new-privileges"],
    # Kubernetes' hostUsers: false: the container's root is not the host's
    # (HOME: the rootfs is not chowned for the map as an image's layers would be)
    "root in a user namespace": ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536",
                                 "--env", "HOME=/tmp"],
}


@pytest.mark.parametrize("who", WHO)
def test_recommended_settings_run_kernels(who):
    done = podman(*RECOMMENDED, *WHO[who], command="ns-kernel doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    uid = 1000 if who.startswith("user") else 65534
    for path in START_PATHS:
        # root in a container lacks CAP_SYS_PTRACE: its prestart falls back to exec (tested).
        way = EXEC if path.how == PRESTARTED and not who.startswith("user") else path.how
        assert (f"  ok    kernel ({path.name}): {way}, pid 2 of 2 processes, /proc proc, "
                "/tmp tmpfs (writable)") in done.stdout
    # Its own cgroup namespace: not the container's path.
    assert f"uid {uid}, network lo, cgroup /, seccomp mode 2" in done.stdout
    assert ("prestart: kernels are exec'd instead (root without CAP_SYS_PTRACE"
            in done.stdout) == (not who.startswith("user"))


def without(syscall):
    """The recommended profile minus one syscall, as a file podman can read."""
    with open(container.PROFILE) as f:
        profile = json.load(f)
    added = profile["syscalls"][-1]
    assert syscall in added["names"]
    added["names"] = [n for n in added["names"] if n != syscall]
    path = f"/tmp/ns-kernel-seccomp-without-{syscall}.json"
    with open(path, "w") as f:
        json.dump(profile, f)
    return path


@pytest.mark.parametrize("syscall", container.SANDBOX_SYSCALLS)
def test_each_syscall_of_the_profile_is_needed(syscall):
    path = without(syscall)
    try:
        done = podman("--security-opt", f"seccomp={path}", "--security-opt", "unmask=ALL",
                      *AS_USER, command="ns-kernel run -- /bin/true; echo run=$?; ns-kernel doctor")
    finally:
        os.unlink(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"a seccomp filter (the container's) denies {syscall}; run the container with "
            "ns_kernel's seccomp profile") in done.stderr
    if syscall == "setns":
        # Only the prestarted interpreter joins: without setns, kernels are exec'd.
        assert "run=0" in done.stdout
    else:
        assert "run=1" in done.stdout
        assert ": Operation not permitted" in done.stderr.splitlines()[0]


@pytest.mark.parametrize("unmask, refused", [("", "proc and sysfs"), ("/proc/*", "sysfs")])
def test_every_masked_path_must_be_unmasked(unmask, refused):
    unmasking = ["--security-opt", f"unmask={unmask}"] if unmask else []
    done = podman("--security-opt", f"seccomp={container.PROFILE}", *unmasking, *AS_USER,
                  command="ns-kernel run -- /bin/true; echo run=$?; ns-kernel doctor")
    assert "run=1" in done.stdout
    assert ("/sys: Operation not permitted" if unmask else "/proc: Operation not permitted") \
        in done.stderr.splitlines()[0]
    assert done.returncode == 1
    assert (f"ns-kernel: a fresh {refused} mount is refused: the container runtime masks parts "
            "of /proc and /sys (") in done.stderr
    assert "/sys/firmware" in done.stderr
    assert ("unmask them: `docker run --security-opt systempaths=unconfined`, `podman run "
            "--security-opt unmask=ALL`; Kubernetes: securityContext.procMount: Unmasked") \
        in done.stderr


# What the docs list as failures, each with the doctor's words for it.
FAILURES = {
    "podman's default profile": ([], "ns-kernel: a seccomp filter (the container's) denies "
                                 "sethostname; run the container with ns_kernel's seccomp "
                                 "profile"),
    "cap-drop ALL": ([*RECOMMENDED, "--cap-drop", "ALL"],
                     "this root lacks CAP_CHOWN, CAP_SETGID, CAP_SETUID (a container with "
                     "--cap-drop ALL?): `docker run --cap-add CHOWN --cap-add SETUID --cap-add "
                     "SETGID`"),
    "an id map without nobody": ([*RECOMMENDED, "--uidmap", "0:100000:60000", "--gidmap",
                                  "0:100000:60000", "--env", "HOME=/tmp"],
                                 "uid 65534 has no mapping in this user namespace (uids "
                                 "0-59999: a container's map?)"),
    "--cpus with read-only cgroups": ([*RECOMMENDED], "cpus 1 needs a cgroup of the kernel's "
                                      "own, and this container's cgroup filesystems are "
                                      "read-only; limit the container itself"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_doctor_names_each_documented_failure(failure):
    args, message = FAILURES[failure]
    options = " --cpus 1" if "cpus" in failure else ""
    done = podman(*args, command=f"ns-kernel doctor{options}")
    assert done.returncode == 1
    assert message in done.stderr, done.stdout + done.stderr
    assert "  --    kernels: none started: fix the above first" in done.stdout
