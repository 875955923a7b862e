"""`ns-kernel doctor [options]`: can this host run isolated kernels, and under which limits?

It reads what governs user namespaces (sysctls, AppArmor) and cgroups (versions, controllers,
delegation), and what a container runtime does to this process (its seccomp filter, masked
/proc and /sys, root's capabilities and id map: container.py; trial.py tries the sandbox's
own syscalls and mounts in throwaway namespaces); names the limits backend a kernel would get;
then proves it: it starts a real kernel each way one starts (the provisioner's, JupyterLab's;
the argv with its TCP bridge; the warm template), with the same options, through
jupyter_client as a Jupyter server does, and reports what each saw inside and how it was
started. Exit 0 when kernels can run; otherwise 1 and the fix, in the words of the
container runtime when it is the cause.
"""
import json
import os
import platform
import shutil
import sys
import tempfile

from . import argv as command_line, cgroup, container, limits, seccomp
from .config import SandboxApp
from .plan import LANDLOCK_ABI, Limits
from .errors import SetupError
from .limittable import CONTROLLERS, LIMITS
from .net import MODES
from .syscalls import CloneFlags, landlock_abi, unshare
from .trial import trial
from .user import HINT_SYSCTLS, read_sysctl, userns_hint

# Runs in each trial kernel: what a kernel sees, and how it was started (prestart.py,
# warm.py: their interpreters imported their own module before they became the kernel).
PROBE = r"""
import json, os, socket, sys
mounts = {}
for line in open("/proc/self/mounts"):
    fields = line.split()
    mounts[fields[1]] = fields[2]
with open("/tmp/.ns-kernel-doctor", "w") as f:
    f.write("tmp is writable")
try:
    os.symlink("/", "link")
    os.unlink("link")
    links = "made"
except OSError as exc:
    links = exc.strerror
print(json.dumps({
    "links": links,
    "started": ("warm" if "ns_kernel.template" in sys.modules else
                "prestarted" if "ns_kernel.prestart" in sys.modules else "exec"),
    "pid": os.getpid(), "uid": os.getuid(), "hostname": socket.gethostname(),
    "processes": sum(p.isdigit() for p in os.listdir("/proc")),
    "proc": mounts.get("/proc"), "tmp": mounts.get("/tmp"),
    "net": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else [],
    "cgroup": " ".join(sorted({l.strip().split(":", 2)[2] for l in open("/proc/self/cgroup")})),
    "proxy": "HTTP_PROXY" in os.environ and socket.socket().connect_ex(("127.0.0.1", 3128)) == 0,
    "seccomp": [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]}))
"""
RLIMIT_CAVEAT = ("rlimits only: " + ", ".join(limit.rlimit_caveat for limit in LIMITS) +
                 "; for cgroups run the server as root (cgroup v1/v2) or delegate a cgroup v2 "
                 "subtree and set --cgroup-parent")


class DoctorApp(SandboxApp):
    name = "ns-kernel-doctor"
    description = __doc__.splitlines()[0]


def show(status, what, detail):
    print(f"  {status:<5} {what}: {detail}", flush=True)


def check_user_namespaces():
    """Can this process make a user namespace? The error line (with the fix), or None."""
    found = []
    for path, _, _ in HINT_SYSCTLS:
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


def check_links(config):
    """What keeps a kernel from making links in the folders the host reads (plan.links_in)."""
    abi = landlock_abi()
    if abi >= LANDLOCK_ABI:
        show("ok", "links", f"Landlock ABI {abi}: kernels make no symlink or FIFO in the "
             "folders the host reads")
        return None
    if config.seccomp == "default":
        show("ok", "links", f"no Landlock (ABI {LANDLOCK_ABI}): the seccomp filter denies "
             "symlinks and FIFOs everywhere in the sandbox")
        return None
    why = (f"ns-kernel: no Landlock here, and Sandbox.seccomp = {config.seccomp}: nothing "
           "would keep kernels from making links the Jupyter server follows; use --seccomp "
           "default, or a Linux with Landlock (5.13+, lsm=...,landlock)")
    show("FAIL", "links", why)
    return why


def check_folder_idmap(config):
    """Root's kernels (never root) and a folder root owns, as nbgrader makes them, with
    --idmap-folder: whether this folder's filesystem can show it to them as theirs
    (plan.folder_idmap), tried on the doctor's working directory."""
    from . import mount, plan, user
    if (not config.idmap_folder or os.getuid() != 0 or not plan.initial_userns()
            or container.missing_root_capabilities()):      # "root's kernels" says why
        return
    cwd = os.getcwd()
    info = os.stat(cwd)
    owner, kernel = (info.st_uid, info.st_gid), (config.sandbox_uid, config.sandbox_gid)
    try:
        userns = user.idmap_namespace(owner, kernel)
    except SetupError:
        return      # no user namespace for the kernel either: said above
    handle = os.open(cwd, os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(mount.idmapped_tree(handle, cwd, userns))
        show("ok", "root's folders", f"{cwd}'s filesystem shows a folder to its kernel as its "
             "own (an idmapped mount): they write a folder root owns as root's")
    except OSError as exc:
        show("info", "root's folders", f"{cwd}'s filesystem cannot show a folder to its kernel "
             f"as its own (an idmapped mount: {exc.strerror}): root's kernels write there only "
             f"where uid {config.sandbox_uid} may")
    finally:
        os.close(handle)
        os.close(userns)


def check_cgroups(config):
    mounts = cgroup.hierarchies()
    v1 = [c for c in CONTROLLERS if c in mounts]
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
         f"{chosen[0]}, for the limits configured: {limits.describe(configured, backend=chosen[0])}"
         f"{note}")
    # Elsewhere the trial kernels' launchers say why, in their words.
    if not ok and container.cgroups_read_only():
        return (f"ns-kernel: {limits.describe(configured)} needs a cgroup of the kernel's own, "
                f"and {container.READ_ONLY_CGROUPS}; {container.CGROUP_FIX}")
    return None


def check_container(config):
    """What a container runtime does to this process, from a throwaway trial of the
    sandbox's own syscalls and mounts (trial.py); its error lines, each with the
    setting that fixes it in the runtime's words."""
    seen = trial()
    if seen.get("unshare"):
        return []            # check_user_namespaces has said why
    errors = []
    denied = container.denied(seen)
    if denied:
        errors.append(f"ns-kernel: {container.seccomp_denies(denied)}")
    show("FAIL" if denied else "ok", "sandbox syscalls",
         f"denied: {', '.join(denied)}" if denied else
         f"{', '.join(container.SANDBOX_SYSCALLS)} allowed" +
         (" (a seccomp filter is on this process)" if container.seccomp_filtered() else ""))
    refused = [fs for fs in ("proc", "sysfs") if seen.get(fs)
               and (fs == "proc" or MODES[config.network].sysfs)]
    masks = container.masked()
    # A denied mount would refuse them too: that fix comes first.
    mountable = "mount" not in denied
    if refused and mountable:
        errors.append(f"ns-kernel: {container.masks_refuse(refused, masks)}")
    if mountable:
        show("FAIL" if refused else "ok", "fresh proc and sysfs",
             f"refused ({', '.join(masks) or 'masked paths'})" if refused else "mountable")
    missing = container.missing_root_capabilities()
    if missing:
        errors.append(f"ns-kernel: {container.root_lacks(missing, config.sandbox_uid)}")
    unmapped = os.getuid() == 0 and not container.mapped(config.sandbox_uid)
    if unmapped and not missing:
        errors.append(f"ns-kernel: root's kernels run as uid {config.sandbox_uid}: "
                      f"{container.unmapped_fix(config.sandbox_uid)}")
    if os.getuid() == 0:
        show("FAIL" if missing or unmapped else "ok", "root's kernels",
             f"run as uid {config.sandbox_uid}; capabilities "
             f"{'lacking ' + ', '.join(missing) if missing else 'to chown and map it: present'}"
             f"; uid map {container.map_text()}")
    return errors


def trial_kernels(argv, config):
    """Start a real kernel each way one starts, through jupyter_client as a Jupyter server
    does, with the doctor's options, and run PROBE in it; the first error line, or None."""
    from jupyter_client.kernelspec import KernelSpecManager
    from . import kernelspec, warm
    data = tempfile.mkdtemp(prefix="ns-kernel-doctor-")
    cwd = os.path.join(data, "notebooks")
    os.mkdir(cwd)
    # Root's kernel runs as another uid: it must enter and write its folder.
    os.chmod(data, 0o755)
    os.chmod(cwd, 0o777 if os.getuid() == 0 else 0o755)
    specs = KernelSpecManager(kernel_dirs=[os.path.join(data, "kernels")])
    try:
        had_template = warm.template_pid() is not None
    except SetupError:
        # One this process may not check (e.g. started with capabilities it lacks): not
        # its to stop; the warm trial starts cold and says why.
        had_template = True
    first = None
    try:
        for path in command_line.START_PATHS:
            how = path.name
            spec = kernelspec.kernel_dict([*argv, *path.options], provisioner=path.provisioner)
            kernelspec.write_kernel_spec(os.path.join(data, "kernels", how), spec)
            seen, error = trial_kernel(specs, how, cwd)
            error = error or judge(seen, config)
            if seen:
                show("FAIL" if error else "ok", f"kernel ({how})", describe(seen))
                if seen["started"] == "exec" and path.how == command_line.PRESTARTED:
                    show("info", "prestart", prestart_note())
            else:
                show("FAIL", f"kernel ({how})", error)
            first = first or error
    finally:
        if not had_template:
            warm.stop()
        shutil.rmtree(data, ignore_errors=True)
    return first


def trial_kernel(specs, name, cwd):
    """(what PROBE saw, None) or (None, the launcher's error line)."""
    from jupyter_client.manager import KernelManager
    log = tempfile.TemporaryFile("w+")
    km = KernelManager(kernel_name=name, kernel_spec_manager=specs)
    output = []
    try:
        km.start_kernel(cwd=cwd, stderr=log)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            kc.execute_interactive(PROBE, timeout=60, output_hook=lambda msg: output.append(
                msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None)
        finally:
            kc.stop_channels()
    except Exception as exc:  # noqa: BLE001 - a kernel that did not start: the launcher says why
        log.seek(0)
        errors = [line for line in log.read().splitlines() if line.startswith("ns-kernel: ")
                  and " limits: " not in line]
        return None, errors[-1] if errors else f"ns-kernel: the kernel did not start ({exc})"
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        log.close()
    return json.loads("".join(output).strip().splitlines()[-1]), None


def describe(seen):
    return (f"{seen['started']}, pid {seen['pid']} of {seen['processes']} processes, /proc "
            f"{seen['proc']}, /tmp {seen['tmp']} (writable), hostname {seen['hostname']}, uid "
            f"{seen['uid']}, network {' '.join(seen['net']) or 'host'}, cgroup "
            f"{seen['cgroup']}, seccomp mode {seen['seccomp']}, a link in its folder: "
            f"{seen['links']}")


def prestart_note():
    """Why a kernel was exec'd although the prestart was on (prestart.py's fallback)."""
    why = "its prestarted interpreter could not join the sandbox"
    if os.getuid() == 0 and not container.has_capability(container.CAP_SYS_PTRACE):
        why = ("root without CAP_SYS_PTRACE (a container's default) may not join a sandbox "
               "whose init is another uid")
    elif container.seccomp_filtered():
        why = "the container's seccomp filter may deny setns"
    return (f"kernels are exec'd instead ({why}): they work, each start costs another "
            "interpreter's imports; --no-prestart skips the attempt")


def check_network(config):
    mode, allowed = MODES[config.network], ""
    if mode.proxy:
        from .proxy import Policy
        allowed = Policy.parse(config.proxy_allow, config.proxy_deny).describe()
    show("ok" if mode.new_netns else "--", f"network {mode.name}",
         mode.doctor.format(allowed=allowed))


def judge(seen, config):
    """The fix for what the trial sandbox saw that a kernel must not, or None."""
    if seen["processes"] > 5 or seen["pid"] > 5:
        return (f"ns-kernel: the sandbox sees {seen['processes']} processes: /proc is not "
                "the sandbox's own (an over-mounted /proc, e.g. Docker's masks?)")
    if seen["proc"] != "proc" or seen["tmp"] != "tmpfs":
        return f"ns-kernel: /proc is {seen['proc']}, /tmp is {seen['tmp']} inside"
    if MODES[config.network].new_netns and seen["net"] not in (["lo"], []):
        return f"ns-kernel: the sandbox sees network interfaces {seen['net']}"
    if MODES[config.network].proxy and not seen["proxy"]:
        return "ns-kernel: no proxy answers at 127.0.0.1:3128 inside (--network proxy)"
    if config.seccomp != "off" and seen["seccomp"] != "2":
        return f"ns-kernel: no seccomp filter inside (Seccomp: {seen['seccomp']})"
    if seen["links"] == "made":
        return ("ns-kernel: the kernel made a symlink in its folder, which the Jupyter server "
                "and git on the host would follow")
    if seen["cgroup"] != "/":
        return (f"ns-kernel: the kernel sees its cgroup as {seen['cgroup']}: it has no cgroup "
                "namespace of its own")
    return None


def main(argv):
    app = DoctorApp()
    config = app.load_sandbox_config(argv)
    print(f"ns-kernel doctor: Linux {platform.release()}, Python {platform.python_version()} "
          f"({sys.executable}), uid {os.getuid()}", flush=True)
    first = check_user_namespaces() or check_seccomp(config)
    errors = [first] if first else []
    errors += filter(None, [check_links(config)])
    errors += check_container(config)
    check_folder_idmap(config)
    errors += filter(None, [check_cgroups(config)])
    check_network(config)
    if errors:
        show("--", "kernels", "none started: fix the above first")
    else:
        errors = list(filter(None, [trial_kernels(argv, config)]))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print("ns-kernel doctor: isolated kernels cannot run here; fix the above.",
              file=sys.stderr, flush=True)
        return 1
    print("ns-kernel doctor: isolated kernels can run here.", flush=True)
    return 0
