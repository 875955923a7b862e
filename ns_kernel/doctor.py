"""`ns-kernel doctor [options]`: can this host run isolated kernels, and under which limits?

It reads what governs user namespaces (sysctls, AppArmor) and cgroups (versions, controllers,
delegation), names the limits backend a kernel would get, then proves it: a throwaway
sandbox runs through `ns-kernel run` with the same options, the path every kernel takes,
and reports what it saw inside. Exit 0 when kernels can run; otherwise 1 and the fix.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from . import cgroup, limits, seccomp
from .config import SandboxApp
from .plan import Limits
from .errors import SetupError
from .syscalls import CloneFlags, unshare
from .user import _HINT_SYSCTLS, read_sysctl, userns_hint

# Runs inside the throwaway sandbox: what a kernel would see.
PROBE = r"""
import json, os, socket, importlib.util
mounts = {}
for line in open("/proc/self/mounts"):
    fields = line.split()
    mounts[fields[1]] = fields[2]
with open("/tmp/.ns-kernel-doctor", "w") as f:
    f.write("tmp is writable")
print(json.dumps({
    "pid": os.getpid(), "uid": os.getuid(), "hostname": socket.gethostname(),
    "processes": sum(p.isdigit() for p in os.listdir("/proc")),
    "proc": mounts.get("/proc"), "tmp": mounts.get("/tmp"),
    "net": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else [],
    "ipykernel": importlib.util.find_spec("ipykernel") is not None,
    "seccomp": [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]}))
"""
RLIMIT_CAVEAT = ("rlimits only: memory gives MemoryError instead of a kill, pids count per "
                 "sandbox, no CPU share; for cgroups run the server as root (cgroup v1/v2) or "
                 "delegate a cgroup v2 subtree and set --cgroup-parent")


class DoctorApp(SandboxApp):
    name = "ns-kernel-doctor"
    description = __doc__.splitlines()[0]


def show(status, what, detail):
    print(f"  {status:<5} {what}: {detail}", flush=True)


def check_user_namespaces():
    """Can this process make a user namespace? The error line (with the fix), or None."""
    found = []
    for path, _, _ in _HINT_SYSCTLS:
        value = read_sysctl(path)
        if value is not None:
            found.append(f"{path[len('/proc/sys/'):].replace('/', '.')}={value}")
    show("info", "user namespace sysctls", ", ".join(found) or "none found")
    child = os.fork()
    if child == 0:
        try:
            unshare(CloneFlags.CLONE_NEWUSER)
            os._exit(0)
        except OSError as exc:
            os._exit(exc.errno)
    err = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if err:
        error = SetupError("user", "unshare(CLONE_NEWUSER)", "", err, userns_hint())
        show("FAIL", "user namespaces", error.line())
        return error.line()
    show("ok", "user namespaces", "a process of uid %d can make one" % os.getuid())
    return None


def check_seccomp(config):
    """The filter every kernel loads last (seal.py) needs the system's libseccomp."""
    if config.seccomp == "off":
        show("--", "seccomp", "off (Sandbox.seccomp): kernels reach every syscall")
        return None
    why = seccomp.available()
    if not why and seccomp.is_profile(config.seccomp):
        try:
            rules = len(seccomp.read_profile(config.seccomp).rules)
        except SetupError as exc:
            show("FAIL", "seccomp", str(exc))
            return str(exc)
        show("ok", "seccomp", f"libseccomp.so.2 loads; profile {config.seccomp}: {rules} rules")
        return None
    show("FAIL" if why else "ok", "seccomp", why or "libseccomp.so.2 loads; the default "
         f"filter denies {len(seccomp.DENIED)} syscalls")
    return f"ns-kernel: {why}, or run without the filter: --seccomp off" if why else None


def check_cgroups(config):
    mounts = cgroup.hierarchies()
    v1 = [c for c in ("memory", "pids", "cpu") if c in mounts]
    show("info", "cgroup v1", f"{', '.join(v1)} mounted" if v1 else "not mounted")
    if "cgroup2" in mounts:
        top = mounts["cgroup2"][0]
        controllers = cgroup.read(os.path.join(top, "cgroup.controllers")) or "no controllers"
        show("info", "cgroup v2", f"{top}: {controllers}; this process in {mounts['cgroup2'][1]}")
    else:
        show("info", "cgroup v2", "not mounted")
    options = limits.probe(config.cgroup_parent, mounts)
    for name, usable, detail in options:
        show("ok" if usable else "--", f"backend {name}", detail)
    chosen = limits.choose(options, config.limits_backend)
    configured = Limits.from_config(config)
    note, ok = "", chosen[1]
    if chosen[0] == "rlimit":
        note = f" ({RLIMIT_CAVEAT})"
        ok = config.best_effort or not limits.rlimit_cannot(limits.wanted(configured))
    show("ok" if ok else "FAIL", "limits backend",
         f"{chosen[0]}, for the limits configured: {limits.describe(configured)}{note}")


def trial_sandbox(argv):
    """Run PROBE through `ns-kernel run` with the caller's options; (seen, error line)."""
    cwd = tempfile.mkdtemp(prefix="ns-kernel-doctor-")
    os.chmod(cwd, 0o755)   # root's sandbox is another uid: it must be able to enter it
    try:
        done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *argv, "--",
                               sys.executable, "-c", PROBE], cwd=cwd, capture_output=True,
                              text=True, timeout=60)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("ns-kernel: ") and " limits: " not in line]
    if done.returncode != 0 or not done.stdout.strip():
        return None, (errors[-1] if errors else
                      f"ns-kernel: the trial sandbox failed (exit {done.returncode}): "
                      f"{done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def judge(seen, config):
    """The fix for what the trial sandbox saw that a kernel must not, or None."""
    if seen["processes"] > 5 or seen["pid"] > 5:
        return (f"ns-kernel: the sandbox sees {seen['processes']} processes: /proc is not "
                "the sandbox's own (an over-mounted /proc, e.g. Docker's masks?)")
    if seen["proc"] != "proc" or seen["tmp"] != "tmpfs":
        return f"ns-kernel: /proc is {seen['proc']}, /tmp is {seen['tmp']} inside"
    if config.network != "host" and seen["net"] not in (["lo"], []):
        return f"ns-kernel: the sandbox sees network interfaces {seen['net']}"
    if config.seccomp != "off" and seen["seccomp"] != "2":
        return f"ns-kernel: no seccomp filter inside (Seccomp: {seen['seccomp']})"
    if not seen["ipykernel"]:
        return (f"ns-kernel: ipykernel is not importable by {sys.executable} inside the "
                "sandbox (install it in this environment, readable by every user)")
    return None


def main(argv):
    app = DoctorApp()
    config = app.load_sandbox_config(argv)
    print(f"ns-kernel doctor: Linux {platform.release()}, Python {platform.python_version()} "
          f"({sys.executable}), uid {os.getuid()}", flush=True)
    error = check_user_namespaces() or check_seccomp(config)
    check_cgroups(config)
    seen = None
    if not error:
        seen, error = trial_sandbox(argv)
        if error and not seen:
            show("FAIL", "trial sandbox", error)
    if seen:
        error = judge(seen, config)
        show("FAIL" if error else "ok", "trial sandbox",
             f"pid {seen['pid']} of {seen['processes']} processes, /proc {seen['proc']}, "
             f"/tmp {seen['tmp']} (writable), hostname {seen['hostname']}, uid {seen['uid']}, "
             f"network {' '.join(seen['net']) or 'host'}, ipykernel "
             f"{'importable' if seen['ipykernel'] else 'missing'}, seccomp mode "
             f"{seen['seccomp']}")
    if error:
        print(f"{error}\nns-kernel doctor: isolated kernels cannot run here; fix the above.",
              file=sys.stderr, flush=True)
        return 1
    print("ns-kernel doctor: isolated kernels can run here.", flush=True)
    return 0
