"""A cold start's head start: the kernel's interpreter is started before its sandbox.

A plain kernel's start is mostly its interpreter importing IPython; building the sandbox
costs the launcher another interpreter, its config and ~20 mounts. Done one after the
other those add up; here they overlap, on the two sides of one socket:

  launcher     spawns the kernel's interpreter first thing (`__main__`, before traitlets),
               then reads the config, builds the plan and the sandbox as ever (spawn)
  interpreter  imports the kernel's modules meanwhile, as the launcher's uid, outside any
               namespace, with only the startup variables and nothing of the notebook's
               directory on sys.path (preload.py), then waits (main)
  init         the sandbox built, sends the plan, a pidfd of itself and the error pipe
               (hand_off) instead of forking the kernel
  interpreter  joins all of init's namespaces at once (setns on the pidfd), takes the
               plan's ids and cwd, and forks a helper inside the PID namespace, which sets
               the last steps every kernel takes (seal.py) and forks the kernel; helper
               and interpreter exit, so the kernel is init's child and PID 2, as after a
               cold start, and the only holder of the modules imported for it

Before it has joined, the interpreter only imports (from the host's view, never from the
notebook's folder) and runs none of the notebook's code; it then gets exactly what init's
own child would: the same namespaces, ids, limits, capabilities and session. When the
interpreter cannot serve (imports failed, a thread appeared, it died before joining),
or joining init's namespaces is refused (setns, e.g. in a container), init forks and
execs the kernel as ever; so does the kernel itself where it could not be
faithful (preload.run_preloaded). Honest differences from an exec'd kernel (os.environ,
sys.path, flags, ids, capabilities and signal dispositions are the same: tested):
/proc/self/environ shows the interpreter's startup variables (its command line is the
kernel's argv: titles.kernel); the memory its imports took is charged to the cgroup the
launcher ran in (cgroups do not move charges), not to the kernel's.
"""
import os
import sys

from . import preload

# The top level stays cheap (__main__ imports it before anything else): each side imports
# what it needs where it runs.

READY_PID = 2         # the kernel's pid inside, as init's first child has it
JOIN_MODULES = ("ns_kernel.forked", "ns_kernel.limits", "ns_kernel.mount", "ns_kernel.plan",
                "ns_kernel.seal", "ns_kernel.seccomp", "ns_kernel.syscalls")
MAX_PLAN = 1 << 20


class Prestarted:
    """The launcher's handle on the interpreter it spawned."""

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock       # inherited by init (through the monitor), which uses it

    def release(self):
        """Close our end: init (forked by now) holds the one that counts."""
        if self.sock:
            self.sock.close()
            self.sock = None

    def close(self):
        """The kernel runs (or never will): the interpreter has left, or must."""
        self.release()
        if self.pid:
            try:
                os.kill(self.pid, 9)    # SIGKILL, without importing signal
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = None


def spawn():
    """Start the kernel's interpreter; None if it cannot be (the kernel then execs). In
    its own session (preload.spawn): Jupyter's killpg (an interrupt, a restart) is for the
    launcher, which forwards it to the kernel."""
    import _socket     # socket.py costs the launcher ~3 ms (enum) before the spawn
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        pid = preload.spawn("ns_kernel.prestart:main", [theirs.fileno()], keep=theirs.fileno())
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()
    return Prestarted(pid, ours)


# -- in init ------------------------------------------------------------------------------

def hand_off(sock, plan, err_w):
    """Have the prestarted interpreter become init's kernel; its pid, or None if it
    cannot (init then forks and execs the kernel itself). Runs while init still has its
    capabilities: the helper must be PID 3 so that the kernel can be PID 2."""
    import pickle
    import socket
    from .errors import SetupError
    try:
        _set_last_pid(READY_PID)
    except OSError:
        return None       # no ns_last_pid (a kernel without CONFIG_CHECKPOINT_RESTORE)
    reply = b""
    me = os.pidfd_open(os.getpid())
    try:
        # Too big a plan (EMSGSIZE), an interpreter killed while importing (EPIPE,
        # ECONNRESET): it has joined nothing; the exec'd kernel will say what it says.
        # With init's stdio (the launcher's /dev/null and pipe), not what the interpreter was
        # spawned with (the server's): the kernel inherits the helper's.
        socket.send_fds(sock, [pickle.dumps(plan)], [me, err_w, 0, 1, 2])
        reply = sock.recv(64)
    except OSError:
        pass
    finally:
        os.close(me)
        sock.close()
    if reply.startswith(b"K"):
        return int(reply[1:])
    if reply == b"N" or _alone():
        _set_last_pid(READY_PID - 1)
        return None
    # It died halfway in: what went wrong is on the error pipe, unless it was killed.
    raise SetupError("prestart", "the kernel's prestarted interpreter exited while it "
                     "entered the sandbox", hint="--no-prestart shows the kernel's own error")


def _alone():
    """Nothing but init in this PID namespace: whatever the interpreter did, no helper or
    kernel of it runs here."""
    return [p for p in os.listdir("/proc") if p.isdigit()] == ["1"]


def _set_last_pid(pid):
    """The next process of this PID namespace gets pid + 1 (ns_last_pid, for CRIU)."""
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


# -- in the interpreter -------------------------------------------------------------------

def main():
    """The interpreter's life: import, wait for init, join, fork the kernel, leave."""
    import pickle
    import signal
    import socket
    import struct
    from .syscalls import set_parent_death_signal
    set_parent_death_signal(signal.SIGKILL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    # The socketpair's other end belongs to the launcher that made it: if that is no longer
    # our parent, it died before the death signal was armed.
    launcher = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i")))[0]
    if os.getppid() != launcher:
        os._exit(0)
    os.chdir("/")
    # With the kernel's modules, everything the join needs: not imported later from the
    # sandbox's view of the files while holding all of its user namespace's capabilities.
    # If that fails, the kernel execs and says why.
    preload.import_kernel_modules(JOIN_MODULES)
    # Never to be collected, as in a warm template: what follows (and the kernel's own
    # start) need not walk them in a full collection.
    import gc
    gc.freeze()
    from . import forked
    from .errors import SetupError
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_PLAN, 5)
    except OSError:
        os._exit(0)
    if not data or len(fds) != 5:
        os._exit(0)      # the launcher gave up, or init execs the kernel itself
    pidfd, err_w, *stdio = fds
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
        os.close(fd)
    if preload.threads() != 1:
        # setns into a user namespace needs a single thread (a sitecustomize started one).
        sock.send(b"N")
        os._exit(0)
    try:
        kernel = _join(pickle.loads(data), sock, pidfd, err_w)
        # None: joining was refused, and nothing was joined: init execs the kernel.
        sock.send(b"K%d" % kernel if kernel else b"N")
    except BaseException as exc:  # noqa: BLE001 - reported, never raised into nothing
        forked.report(err_w, SetupError.from_exception(exc, "prestart", "enter the sandbox"))
    os._exit(0)


def _join(plan, sock, pidfd, err_w):
    from . import forked, mount
    from .errors import SetupError
    from .net import MODES
    from .syscalls import CloneFlags, drop_supplementary_groups, setns
    flags = (CloneFlags.CLONE_NEWUSER | CloneFlags.CLONE_NEWNS | CloneFlags.CLONE_NEWIPC
             | CloneFlags.CLONE_NEWUTS | CloneFlags.CLONE_NEWPID | CloneFlags.CLONE_NEWCGROUP)
    if MODES[plan.network].new_netns:
        flags |= CloneFlags.CLONE_NEWNET
    if plan.drop_groups:
        drop_supplementary_groups()
    try:
        setns(pidfd, flags)
    except OSError:
        # setns on a pidfd joins all of them or none. Refused (EPERM): host root in a
        # container without CAP_SYS_PTRACE may not join a sandbox whose init is another
        # uid, or the container's seccomp filter denies setns. An exec'd kernel needs
        # neither: it is the documented fallback, not an error.
        return None
    os.close(pidfd)
    forked.take_ids(plan)
    mount.enter_cwd(plan.cwd)
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(r)
        forked.run(lambda *args: _helper(w, *args), plan, sock, err_w)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        kernel = pipe.read()
    os.waitpid(helper, 0)
    if not kernel:
        raise SetupError("prestart", "fork the kernel")
    return int(kernel)


def _helper(w, plan, sock, err_w):
    """PID 3 of the sandbox: init's last steps, then the kernel, then gone."""
    from . import forked, seal
    from .errors import SetupError
    try:
        _set_last_pid(READY_PID - 1)
    except OSError as exc:
        raise SetupError("prestart", "write", "/proc/sys/kernel/ns_last_pid", exc.errno) from None
    seal.seal(plan)
    kernel = os.fork()
    if kernel == 0:
        os.close(w)
        forked.run(preload.run_preloaded, plan, sock, err_w)
    os.write(w, str(kernel).encode())
    os._exit(0)
