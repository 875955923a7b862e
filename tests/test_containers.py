"""Kernels in real containers (podman with runc), from a Debian bookworm rootfs built on this
machine (scripts/test-containers: mmdebstrap: python3, libseccomp2, libstdc++6) with this venv bound in
read-only: the settings docs/containers.md recommends run every way a kernel starts, as the
container's root and as an ordinary user; they are also the minimal ones (dropping any one
fails, with the message the docs give); and the doctor names each failure the docs list.

Tier `container`: `scripts/test-containers` (root) installs what it needs and runs it."""
import json
import os
import re
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
ROOT_CAPABILITIES = ("CHOWN", "SETUID", "SETGID")


def cap_add(names):
    return [arg for name in names for arg in ("--cap-add", name)]


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
    # The capabilities the docs name for root, and no other one.
    "root with only CHOWN, SETUID, SETGID": ["--cap-drop", "ALL", *cap_add(ROOT_CAPABILITIES)],
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
    fix = (f"a seccomp filter (the container's) denies {syscall}; run the container with "
           "ns_kernel's seccomp profile")
    doctors = done.stderr.splitlines()[1:]
    assert any(fix in line for line in doctors), done.stderr
    if syscall == "setns":
        # Only the prestarted interpreter joins: without setns, kernels are exec'd.
        assert "run=0" in done.stdout
    else:
        # The launcher's one line (the server log's) names the same fix.
        assert "run=1" in done.stdout
        assert f": Operation not permitted ({fix}" in done.stderr.splitlines()[0]


@pytest.mark.parametrize("unmask, refused", [("", "proc and sysfs"), ("/proc/*", "sysfs")])
def test_every_masked_path_must_be_unmasked(unmask, refused):
    unmasking = ["--security-opt", f"unmask={unmask}"] if unmask else []
    done = podman("--security-opt", f"seccomp={container.PROFILE}", *unmasking, *AS_USER,
                  command="ns-kernel run -- /bin/true; echo run=$?; ns-kernel doctor")
    assert "run=1" in done.stdout
    assert done.returncode == 1
    fix = ("unmask them: `docker run --security-opt systempaths=unconfined`, `podman run "
           "--security-opt unmask=ALL`; Kubernetes: securityContext.procMount: Unmasked")
    # The launcher's one line: the first mount refused, and the fix.
    first = "sysfs on /sys" if unmask else "proc on /proc"
    assert (f"ns-kernel: mount {first}: Operation not permitted (a fresh {first.split()[0]} "
            "mount is refused: the container runtime masks parts of /proc and /sys; "
            f"{fix}") in done.stderr.splitlines()[0]
    # The doctor's: both refusals, and what is mounted over.
    assert (f"ns-kernel: a fresh {refused} mount is refused: the container runtime masks parts "
            "of /proc and /sys (") in done.stderr
    assert "/sys/firmware" in done.stderr
    assert fix in done.stderr.splitlines()[-2]


ROOT_LACKS = ("(a container with --cap-drop ALL?): `docker run --cap-add CHOWN --cap-add "
              "SETUID --cap-add SETGID`")
# What the docs list as failures: podman args, the launcher's one line (its start, the
# fix in it) and the doctor's words (its fix).
FAILURES = {
    "podman's default profile": (
        [], "sethostname isolated-", "(a seccomp filter (the container's) denies sethostname; "
        "run the container with ns_kernel's seccomp profile",
        "ns-kernel: a seccomp filter (the container's) denies sethostname; run the container "
        "with ns_kernel's seccomp profile"),
    "cap-drop ALL": (
        [*RECOMMENDED, "--cap-drop", "ALL"], "chown :65534 /tmp/ns-kernel-0/",
        f"(root's kernels run as another uid, but this root lacks CAP_CHOWN, CAP_SETGID, "
        f"CAP_SETUID {ROOT_LACKS}",
        f"this root lacks CAP_CHOWN, CAP_SETGID, CAP_SETUID {ROOT_LACKS}"),
    **{f"cap-drop ALL, cap-add all but {name}": (
        [*RECOMMENDED, "--cap-drop", "ALL", *cap_add(c for c in ROOT_CAPABILITIES if c != name)],
        first,
        f"(root's kernels run as another uid, but this root lacks CAP_{name} {ROOT_LACKS}",
        f"this root lacks CAP_{name} {ROOT_LACKS}")
       for name, first in (("CHOWN", "chown :65534 /tmp/ns-kernel-0/"),
                           ("SETUID", "write '65534 65534 1' to /proc/"),
                           ("SETGID", "setgroups([])"))},
    "an id map without nobody": (
        [*RECOMMENDED, "--uidmap", "0:100000:60000", "--gidmap", "0:100000:60000", "--env",
         "HOME=/tmp"], "chown :65534 /tmp/ns-kernel-0/",
        "(gid 65534 has no mapping in this user namespace (gids 0-59999: a container's map?): "
        "pick a mapped uid (--uid 1000 --gid 1000) or give the container a map of 65536 ids",
        "uid 65534 has no mapping in this user namespace (uids 0-59999: a container's map?)"),
    "--cpus with read-only cgroups": (
        [*RECOMMENDED], "rlimit cannot enforce cpus",
        "(this container's cgroup filesystems are read-only; limit the container itself",
        "cpus 1 needs a cgroup of the kernel's own, and this container's cgroup filesystems "
        "are read-only; limit the container itself"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_each_documented_failure_names_its_fix(failure):
    args, start, fix, doctors = FAILURES[failure]
    options = " --cpus 1" if "cpus" in failure else ""
    done = podman(*args, command=f"ns-kernel run{options} -- /bin/true; echo run=$?; "
                                 f"ns-kernel doctor{options}")
    assert done.returncode == 1
    # The launcher's one line (what the server log shows for a kernel), then the doctor's.
    launcher = done.stderr.splitlines()[0]
    assert "run=1" in done.stdout and launcher.startswith(f"ns-kernel: {start}"), launcher
    assert fix in launcher, launcher
    assert doctors in done.stderr, done.stdout + done.stderr
    assert "  --    kernels: none started: fix the above first" in done.stdout


# The docs' KubeSpawner config, field by field, and the podman setting each one is in the
# pod's words: (path in the pod kubespawner renders, value, podman args run above).
POD_FIELDS = [
    (("spec", "host_users"), False, ["--uidmap", "0:100000:65536"]),
    (("spec", "containers", 0, "security_context", "procMount"), "Unmasked",
     ["--security-opt", "unmask=ALL"]),
    (("spec", "containers", 0, "security_context", "seccompProfile"),
     {"type": "Localhost", "localhostProfile": "ns-kernel.json"},
     ["--security-opt", f"seccomp={container.PROFILE}"]),
    (("spec", "containers", 0, "security_context", "allowPrivilegeEscalation"), False,
     ["--security-opt", "no-new-privileges"]),
]


def run_here(args):
    """Do kernels run above with these podman args (in this order) among the settings?"""
    return any(tried[i:i + len(args)] == args for tried in (RECOMMENDED, *WHO.values())
               for i in range(len(tried)))


def test_kubespawner_renders_the_settings_tested_here():
    """No cluster here: kubespawner itself turns the docs' config into the pod it would ask
    for (KubeSpawner.get_pod_manifest), and each field is one a podman run above tested."""
    import asyncio
    from traitlets.config import Config
    from kubespawner import KubeSpawner
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "containers.md")) as f:
        [snippet] = [b for b in re.findall(r"^```python\n(.*?)^```$", f.read(), re.S | re.M)
                     if "KubeSpawner" in b]
    config = Config()
    exec(snippet, {"c": config})
    # Where its client looks for the cluster (the test's own HOME), which a spawner only
    # reads: nothing is asked of it.
    kube = os.path.expanduser("~/.kube")
    os.makedirs(kube)
    with open(f"{kube}/config", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "none",
                   "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
                   "users": [{"name": "none", "user": {}}],
                   "contexts": [{"name": "none", "context": {"cluster": "none",
                                                             "user": "none"}}]}, f)

    async def render():
        return (await KubeSpawner(config=config, _mock=True).get_pod_manifest()).to_dict()
    try:
        pod = asyncio.run(render())
    finally:
        shutil.rmtree(kube)
    assert pod["spec"]["containers"][0]["image"].endswith("/isolated-python")
    for path, value, podman_args in POD_FIELDS:
        found = pod
        for key in path:
            found = found[key]
        assert found == value, (path, found)
        assert run_here(podman_args), podman_args
