"""The argv launcher: what kernel.json runs as `python -P -m ns_kernel -f {connection_file}`.

It reads like the steps it takes (__main__ has spawned the kernel's interpreter already,
which imports ipykernel meanwhile: prestart.py):
  1. read and check the client's connection file
  2. decide which backend enforces the limits, and build the plan: complete, pure;
     option conflicts die here, before anything exists
  3. make the kernel's cgroup, and start moving into it what exists already (the
     prestarted interpreter, a warm start's monitor: cgroup v1 waits meanwhile)
  4. bind the client's TCP ports (tcp clients) or link its ipc paths (ipc clients)
  5. make the private socket dir and the inner kernel's ipc connection file
  6. start the sandbox (in the kernel's cgroup, with the prestarted interpreter, if any)
  7. relay bytes, forward signals, watch the Jupyter server, until the kernel exits
     (supervise.py)
  8. remove everything made in 3-5 (the record of it: made.py), say why the kernel died if
     it did not exit cleanly (and not by Jupyter's own signal), and exit with the kernel's
     own status
A warm start without a bridge hands 7 and 8 to the sandbox's monitor once the kernel
runs, and leaves (handoff.py): one host process per kernel instead of two.
"""
import os
import re
import sys
import time

from . import (bridge, connection, handoff, limits, mount, notice, offline, output, reaper,
               seccomp, socketdir, state, usage)
from .errors import SetupError
from .net import MODES as NETWORK_MODES
from .plan import SOCKET_DIR_INSIDE, Host, Limits, build_plan, under
from .sandbox import Sandbox
from .supervise import Life, Supervisor, server_pidfd


def kernel_id_from(path):
    match = re.search(r"kernel-([0-9a-fA-F-]+)\.json$", path or "")
    return match.group(1).replace("-", "") if match else ""


def kernel_argv(extra):
    return [sys.executable, "-m", "ipykernel_launcher",
            "-f", f"{SOCKET_DIR_INSIDE}/connection.json", *extra]


def kernel_extensions(info, config, previous, limits_in_force):
    """What the kernel loads besides ipykernel (IPython extensions, config): the notice of
    why the previous one died, the offline hint, CurveZMQ's keys, the usage panel's limits;
    and, always, the reaper (a quick shutdown with children)."""
    extra = [reaper.EXTENSION_ARGV, *([notice.EXTENSION_ARGV] if previous else [])]
    if NETWORK_MODES[config.network].offline_hint:
        extra += offline.argv(config)
    if connection.CURVE_KEYS[0] in info:
        extra.append(connection.CURVE_CONFIG_ARGV)
    return [*extra, *usage.argv(limits_in_force, limits_in_force.skipped)]


def kernel_sockets(info):
    """The names of the kernel's sockets in its socket dir, one per channel."""
    return tuple(os.path.basename(connection.socket_path(SOCKET_DIR_INSIDE, info[name]))
                 for name in connection.CHANNELS)


def command_argv(argv):
    if not argv:
        raise SetupError("usage", "no command", hint="use `ns-kernel run [options] -- CMD`")
    import shutil   # `ns-kernel run` only; a kernel's start need not pay for it
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if not path:
        raise SetupError("run", f"command not found: {argv[0]}", hint="give its full path")
    return [os.path.abspath(path), *argv[1:]]


class Warm:
    """What a warm template gives the launcher it forks for a request (template.py):
    spawn(plan, ctl, err_w, handles, stdio) -> pid starts the sandbox's monitor (the spare
    one, forked beside the launcher, whose pid is spare_monitor: moved into the cgroup
    early); requester: the request's socket, which turns readable when its other end
    closes (supervise.Abandoned)."""
    __slots__ = ("spawn", "requester", "spare_monitor")

    def __init__(self, spawn, requester, spare_monitor):
        self.spawn, self.requester, self.spare_monitor = spawn, requester, spare_monitor


def run(config, start, prestarted=None, warm=None):
    """Run the kernel of start (argv.KernelStart), or its command (`ns-kernel run`: no
    connection file, start.extra is the command), to its end; remove what it made. Returns
    (its raw wait status, the Supervisor, which explains it). prestarted: the kernel's
    interpreter, spawned already (prestart.py); warm: a warm template's (Warm)."""
    sup = Supervisor(Life(who(start.connection_file)),
                     requester=warm.requester if warm else None)
    sup.install_signal_handlers()
    sup.prestarted = prestarted
    try:
        # From the start: a server that dies while the sandbox is built is seen too.
        sup.server = server_pidfd(bool(start.connection_file))
        sup.box = _start(config, start, sup, warm)
        return sup.run(), sup
    finally:
        sup.cleanup()


def _start(config, start, sup, warm):
    """Steps 1-6 (the module's doc): what they make is recorded in sup.life.made as it is
    made, so that cleanup removes it whatever step fails. Returns the started Sandbox."""
    life, made = sup.life, sup.life.made
    began = time.monotonic()    # a restart's stale control messages expire from here
    if start.connection_file:
        info = connection.read(start.connection_file)
        life.connection_file = start.connection_file
        argv = kernel_argv(start.extra)
    else:
        info, argv = None, command_argv(start.extra)
    host = Host.probe(binds=(*config.ro_binds, *config.rw_binds),
                      writable=(*config.rw_binds, *(["~"] if config.home == "shared" else [])))
    socket_dir = (socketdir.check_length(os.path.abspath(start.socket_dir))
                  if start.socket_dir else socketdir.choose(config.socket_dir))
    previous = notice.recall(start.connection_file, info) if info else ""
    # Which backend enforces the limits, and what it cannot: nothing made yet.
    decided = limits.decide(Limits.from_config(config), config.cgroup_parent)
    if info:
        argv += kernel_extensions(info, config, previous, decided)
    profile = seccomp.read_profile(config.seccomp) if seccomp.is_profile(config.seccomp) else None
    kernel_id = kernel_id_from(start.connection_file)
    plan = build_plan(config, host, argv, socket_dir, kernel_id, profile, decided,
                      kernel_sockets(info) if info else ())
    life.home_kept = not any(dot for _, dot in plan.discarded)
    # The kernel's cgroup, and the move into it of what exists already (the prestarted
    # interpreter, a warm start's monitor): on cgroup v1 it waits for an RCU grace period
    # (10-15 ms here), beside the steps up to the sandbox's start.
    sup.limits = limits.enforce(plan.limits, config.cgroup_parent, kernel_id)
    if sup.limits.cgroup:
        made.cgroups, made.cgroup_version = sup.limits.cgroup.dirs, sup.limits.cgroup.version
    sup.limits.attach_soon([pid for pid in (sup.prestarted and sup.prestarted.pid,
                                            warm and warm.spare_monitor) if pid])
    sup.started_lines = started_lines(plan, sup.limits, life.who)
    if info and info["transport"] == "tcp":
        sup.listeners = bridge.listen(info)
        sup.tcp_owners = None if config.tcp_clients == "any" else {os.getuid()}
        sup.held = {info["control_port"]: began + bridge.STALE_CONTROL}
    sup.egress = plan.egress
    # The template's spare monitor can do all that is left but a bridge's relay and a
    # proxy's threads: a process that has unshared a PID namespace for its children cannot
    # start a thread (clone(2): EINVAL).
    if info and warm and not sup.listeners and not NETWORK_MODES[plan.network].proxy:
        sup.hand_off = handoff.hand_off
    owner = (plan.uid_map.outside, plan.gid_map.outside) if host.uid == 0 else None
    made.socket_dir = socketdir.create(socket_dir, owner)
    state.prepare(plan.state_dirs, owner)
    if info:
        connection.write(f"{socket_dir}/connection.json",
                         connection.inner(info, SOCKET_DIR_INSIDE), *(owner or (None, None)))
    if previous:
        notice.leave_notice(made.socket_dir, previous, owner)
    if info and info["transport"] == "ipc":
        # An ipc client connects to <ip>-<port>: point those at the kernel's sockets.
        made.links = socketdir.link_ipc_paths(info, made.socket_dir)
    # Taken as given: the dirs made just now for this kernel.
    handles = mount.open_sources(plan.mounts, host.cwd, trusted={made.socket_dir,
                                                                 *plan.state_dirs})
    # A kernel's stdio: /dev/null and a pipe to the log (output.py); a command of
    # `ns-kernel run` keeps the admin's terminal.
    stdio = (0, 1, 2)
    if info:
        read, write = os.pipe2(os.O_CLOEXEC)
        sup.output = output.Relay(read, life.who)
        stdio = (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), write, write)
    try:
        return Sandbox(plan, sup.limits.attach, sup.prestarted, handles,
                       stdio).start(warm and warm.spawn)
    finally:
        mount.close_all(handles)    # the monitor has them now
        if info:
            mount.close_all(set(stdio))


def started_lines(plan, enforcement, who):
    """For the server log once the sandbox stands: the limits in force, the filter if it is
    not the default one."""
    lines = enforcement.log_lines(plan.limits, who)
    if not plan.seccomp or plan.seccomp.source:
        lines.append(f"ns-kernel: {who}: " + (
            f"seccomp profile {plan.seccomp.source}" if plan.seccomp else
            "no seccomp filter (Sandbox.seccomp = off)"))
    return lines


def who(connection_file):
    """The kernel as a person knows it: Jupyter's kernel id, else (nbconvert, nbclient,
    nbgrader: a temporary connection file) that file's name and the notebook's folder."""
    if not connection_file:
        return "command"
    kernel_id = kernel_id_from(connection_file)
    if kernel_id:
        return f"kernel {kernel_id[:8]}"
    home, folder = os.path.expanduser("~"), os.getcwd()
    name = os.path.basename(connection_file).removesuffix(".json")
    return f"kernel {name} in {'~' + folder[len(home):] if under(folder, home) else folder}"
