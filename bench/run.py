"""Isolated Python next to a plain ipykernel, measured in one run.

    bench/run [--quick] [--rounds N] [--json FILE]
    bench/run --soak N [--alive M]

Every figure is taken for a plain ipykernel (a kernelspec running the same interpreter's
`-m ipykernel_launcher`) and for Isolated Python in the same run, alternating kinds within
each round, over several rounds; the table shows medians (latency: p50/p99 over all
samples) and the ratio isolated/plain next to the target. Kernels are started through
jupyter_client's KernelManager, as every Jupyter client does.

Rows:
  start        launch (KernelManager.start_kernel) to the kernel_info reply
  shutdown     a graceful KernelManager.shutdown_kernel(), of an idle kernel and of one
               whose child (a `subprocess.Popen` never waited for) is alive
  round trip   execute_request of `pass` to its reply and the iopub idle status
  output       a cell printing 100 MB in 1 MB chunks; a 20 MB display_data payload
  memory       PSS (/proc/PID/smaps_rollup) summed over the kernel's whole process tree;
               a warm kernel's also counts the warm template's whole tree (the template,
               every kernel's launcher, monitor, init and kernel) divided over the kernels
               it serves, and, for one kernel alone, all of it
  scale        N kernels started at once: time until all answer, host memory held
  proxy        a download from an HTTP server on host loopback by a `--network host`
               kernel and by a `--network proxy` one (through its proxy), alternating; the
               proxy's memory (its launcher's PSS over a host kernel's launcher's); round
               trips while the kernel downloads in a loop (the ZMQ relay is not stalled)

The client uses a 10 ms ZMQ reconnect interval (default 100 ms) for every kind alike, so
that start times are not rounded up to the next reconnect attempt.
"""
import argparse
import ast
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import zmq
from jupyter_client.manager import KernelManager

from ns_kernel import kernelspec

TRIVIAL = "pass"
# A child the notebook never waits for (ipykernel's shutdown waits for its children).
CHILD_CODE = "import subprocess; child = subprocess.Popen(['sleep', '300'])"
# Kinds that start from the warm template (the default).
WARM_KINDS = ("isolated", "provisioner", "nofilter")
ISOLATED = ("isolated", "provisioner", "cold")    # the kinds with targets
PRINT_CODE = ("import sys\nchunk = 'x' * (1 << 20)\n"
              "for _ in range({n}):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()\n")
DOWNLOAD_CODE = r'''
import threading, urllib.request
def download(url):
    with urllib.request.urlopen(url) as r:
        while r.read(1 << 20):
            pass
def download_forever(url, done):
    while not done.is_set():
        download(url)
'''
PROXY_SERVER = "127.0.0.2"     # host loopback, not the kernel's own 127.0.0.1
DISPLAY_CODE = ("from IPython.display import display\n"
                "display({{'image/png': 'A' * ({n} << 20)}}, raw=True)\n")


class Died(Exception):
    """A kernel the bench started died before it answered."""


class Kinds:
    """The kernelspecs compared, in a private Jupyter data dir readable by every uid (the
    sandbox runs as nobody when root runs the bench)."""

    def __init__(self):
        self.data = tempfile.mkdtemp(prefix="ns-kernel-bench-")
        os.chmod(self.data, 0o755)
        os.environ["JUPYTER_PATH"] = self.data
        self.names = {}
        self._spec("plain", {"argv": [sys.executable, "-m", "ipykernel_launcher",
                                      "-f", "{connection_file}"],
                             "display_name": "plain", "language": "python",
                             "interrupt_mode": "signal"})
        self.missing = {}
        # What `ns-kernel install` writes: warm, on the provisioner's path and the argv one.
        spec = kernelspec.kernel_dict()
        if "kernel_provisioner" in spec["metadata"]:
            self._spec("provisioner", spec)
        else:
            self.missing["provisioner"] = "kernel.json names no provisioner"
        self._spec("isolated", argv_only(spec))
        # The opt-out: a cold start, the kernel's interpreter prestarted (prestart.py).
        self._spec("cold", argv_only(kernelspec.kernel_dict(["--cold"])))
        # For comparison: the kernel exec'd once the sandbox is built.
        self._spec("exec", argv_only(kernelspec.kernel_dict(["--no-prestart"])))
        # What the seccomp filter costs: the argv path without it.
        self._spec("nofilter", argv_only(kernelspec.kernel_dict(["--seccomp=off"])))

    def _spec(self, kind, spec):
        name = f"bench-{kind}"
        kernelspec.write_kernel_spec(os.path.join(self.data, "kernels", name), spec)
        self.names[kind] = name

    def add_network(self, port):
        """A kernel with the host's network, and one with a proxy allowed to the bench's
        file server (on `port`) alone."""
        self._spec("host", argv_only(kernelspec.kernel_dict(["--network", "host"])))
        self._spec("proxy", argv_only(kernelspec.kernel_dict([
            "--network", "proxy", "--allow", f"{PROXY_SERVER}:{port}"])))

    def __contains__(self, kind):
        return kind in self.names

    def close(self):
        shutil.rmtree(self.data, ignore_errors=True)


def argv_only(spec):
    """The same kernelspec without the provisioner: the argv launcher path, which every
    client (also those before jupyter_client 7) takes."""
    metadata = {k: v for k, v in spec["metadata"].items() if k != "kernel_provisioner"}
    return dict(spec, metadata=metadata)


class Bench:
    def __init__(self, kinds, workdir, log_path):
        self.kinds = kinds
        self.workdir = workdir
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.RECONNECT_IVL, 10)
        self.ipc_dir = tempfile.mkdtemp(prefix="nsb-")
        self.count = 0
        # The kernels' own output (ipykernel's warnings, the launcher's log) goes here.
        self.log_path = log_path
        self.log = open(log_path, "w")

    # -- kernels ------------------------------------------------------------------------
    def launch(self, kind, transport="tcp"):
        """Start a kernel; return (manager, client, t0). The client's shell is connected."""
        self.count += 1
        kw = {}
        if transport == "ipc":
            kw = {"transport": "ipc", "ip": f"{self.ipc_dir}/{self.count}"}
        km = KernelManager(kernel_name=self.kinds.names[kind], **kw)
        t0 = time.perf_counter()
        km.start_kernel(cwd=self.workdir, stdout=self.log, stderr=self.log)
        kc = km.client(context=self.ctx)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        kc.kernel_info()
        return km, kc, t0

    def wait_ready(self, kc, timeout=120, km=None):
        """When kc's kernel_info reply came; Died at once if km's kernel has died, or
        once timeout has passed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = kc.get_shell_msg(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if km is not None and not km.is_alive():
                    raise Died(f"a kernel died before its kernel_info reply{self.log_tail()}"
                               ) from None
                if time.monotonic() >= deadline:
                    raise Died(f"a kernel did not answer kernel_info in {timeout} s"
                               f"{self.log_tail()}") from None
                continue
            if msg["msg_type"] == "kernel_info_reply":
                return time.perf_counter()

    def start(self, kind, transport="tcp"):
        km, kc, t0 = self.launch(kind, transport)
        elapsed = self.wait_ready(kc) - t0
        # Let iopub's subscription settle, so that the first cell's output is not lost.
        self.execute(kc, TRIVIAL)
        return km, kc, elapsed

    @staticmethod
    def stop(km, kc):
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    @staticmethod
    def execute(kc, code, timeout=300):
        """Run code; return the seconds until both its reply and the idle status came."""
        t0 = time.perf_counter()
        msg_id = kc.execute(code, store_history=False)
        idle = replied = False
        while not (idle and replied):
            if not idle:
                msg = kc.get_iopub_msg(timeout=timeout)
                idle = (msg["parent_header"].get("msg_id") == msg_id
                        and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle")
            if idle and not replied:
                msg = kc.get_shell_msg(timeout=timeout)
                replied = msg["parent_header"].get("msg_id") == msg_id
        return time.perf_counter() - t0

    # -- the figures --------------------------------------------------------------------
    def starts(self, kinds, rounds):
        times = {k: [] for k in kinds}
        for r in range(rounds):
            for kind in rotate(kinds, r):
                km, kc, elapsed = self.start(kind)
                times[kind].append(elapsed)
                self.stop(km, kc)
        return times

    def shutdowns(self, kinds, rounds, code):
        """Seconds of a graceful shutdown (KernelManager.shutdown_kernel(), as a server's
        Shut Down) of a kernel that has run `code`."""
        times = {k: [] for k in kinds}
        for r in range(rounds):
            for kind in rotate(kinds, r):
                km, kc, _ = self.start(kind)
                self.execute(kc, code)
                kc.stop_channels()
                t0 = time.perf_counter()
                km.shutdown_kernel()
                times[kind].append(time.perf_counter() - t0)
        return times

    def latency_and_output(self, lanes, rounds, n, out_mb, display_mb):
        """lanes: {label: (kind, transport)}; one kernel each, alive for all rounds."""
        kernels = {label: self.start(*lane)[:2] for label, lane in lanes.items()}
        rtt = {label: [] for label in lanes}
        out = {label: [] for label in lanes}
        disp = {label: [] for label in lanes}
        mem = {}
        try:
            for label, (_, kc) in kernels.items():
                for _ in range(20):   # warm up: first cells compile and import
                    self.execute(kc, TRIVIAL)
            time.sleep(0.5)
            # A warm kernel's host processes live under the template: each kernel counts
            # its own (warm_kernel_pss), and the rest of the template's tree (the template
            # and the pair it keeps forked) divided over the kernels it serves.
            own = {label: warm_kernel_pss(km, kc) for label, (km, kc) in kernels.items()
                   if lanes[label][0] in WARM_KINDS}
            shared = (template_pss() - sum(own.values())) / len(own) if own else 0
            for label, (km, _) in kernels.items():
                extra = own[label] + shared if label in own else 0
                mem[label] = (host_pss(km) + extra) / (1 << 20)
            labels = list(lanes)
            for r in range(rounds):
                for label in rotate(labels, r):
                    kc = kernels[label][1]
                    rtt[label] += [self.execute(kc, TRIVIAL) for _ in range(n // rounds)]
                for label in rotate(labels, r):
                    kc = kernels[label][1]
                    out[label].append(self.execute(kc, PRINT_CODE.format(n=out_mb)))
                    disp[label].append(self.execute(kc, DISPLAY_CODE.format(n=display_mb)))
        finally:
            for km, kc in kernels.values():
                self.stop(km, kc)
        return rtt, out, disp, mem

    def log_tail(self, lines=15):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
        return "; the kernels' log ends:\n  " + "\n  ".join(tail)

    def scale(self, kind, count, tries=3):
        """Start `count` kernels at once; seconds until all answered kernel_info, and the
        host memory they hold (MemTotal - MemAvailable, over the idle baseline) and their
        summed PSS, in MB. A round of plain kernels where one died or never answered is
        said and run again: jupyter_client picks a kernel's TCP ports by binding port 0 and
        letting go, and another process (the test suite runs two passes at once) can take
        one before the kernel binds it. Isolated kernels get no second try."""
        for _ in range(tries - 1 if kind == "plain" else 0):
            try:
                return self._scale(kind, count)
            except Died as exc:
                print(f"bench: {count} starts at once, {kind}: {exc}\nonce more", flush=True)
        return self._scale(kind, count)

    def _scale(self, kind, count):
        before = host_used()
        started = [self.launch(kind) for _ in range(count)]
        t0 = started[0][2]
        try:
            last = max(self.wait_ready(kc, timeout=60, km=km) for km, kc, _ in started)
            elapsed = last - t0
            for _, kc, _ in started:
                self.execute(kc, TRIVIAL)
            time.sleep(1.0)
            held = host_used() - before
            pss = sum(host_pss(km) for km, _, _ in started)
            pss = (pss + (template_pss() if kind in WARM_KINDS else 0)) / (1 << 20)
        finally:
            for km, kc, _ in started:
                self.stop(km, kc)
        return elapsed, held, pss

    def downloads(self, rounds, mb, n_rtt):
        """{kind: seconds of each download of mb MB}, {kind: launcher PSS in MB},
        {kind: round trips while downloading} and {kind: launcher CPU seconds per GB} for
        kinds host and proxy."""
        folder = tempfile.mkdtemp(prefix="ns-kernel-bench-files-")
        os.chmod(folder, 0o755)
        with open(os.path.join(folder, "blob"), "wb") as f:
            f.write(os.urandom(1 << 20) * mb)
        os.chmod(os.path.join(folder, "blob"), 0o644)
        server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind",
                                   PROXY_SERVER, "--directory", folder, "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        kernels = {}
        try:
            port = int(server.stdout.readline().split(" port ")[1].split()[0])
            self.kinds.add_network(port)
            url = f"http://{PROXY_SERVER}:{port}/blob"
            kernels = {kind: self.start(kind)[:2] for kind in ("host", "proxy")}
            took = {kind: [] for kind in kernels}
            for _, kc in kernels.values():
                self.execute(kc, DOWNLOAD_CODE)
                self.execute(kc, f"download({url!r})")    # warm up
            launchers = {kind: launcher_pid(km) for kind, (km, _) in kernels.items()}
            cpu = {kind: -cpu_seconds(pid) for kind, pid in launchers.items()}
            for r in range(rounds):
                for kind in rotate(list(kernels), r):
                    for _ in range(3):
                        took[kind].append(self.execute(kernels[kind][1], f"download({url!r})"))
            # The launcher's CPU per GB: what the proxy costs, whatever else loads the host.
            for kind, pid in launchers.items():
                cpu[kind] = (cpu[kind] + cpu_seconds(pid)) / (len(took[kind]) * mb / 1024)
            mem = {kind: pss_tree(pid, descend=False) / (1 << 20)
                   for kind, pid in launchers.items()}
            busy = {}
            for kind, (_, kc) in kernels.items():
                self.execute(kc, "done = threading.Event(); threading.Thread(target="
                             f"download_forever, args=({url!r}, done)).start()")
                busy[kind] = [self.execute(kc, TRIVIAL) for _ in range(n_rtt)]
                self.execute(kc, "done.set()")
        finally:
            for km, kc in kernels.values():
                self.stop(km, kc)
            server.terminate()
            server.wait()
            shutil.rmtree(folder, ignore_errors=True)
        return took, mem, busy, cpu

    def alone(self, kind):
        """MB of PSS of one kernel with no other alive (a warm one: the whole template)."""
        km, kc = self.start(kind)[:2]
        try:
            for _ in range(20):
                self.execute(kc, TRIVIAL)
            time.sleep(0.5)
            extra = template_pss() if kind in WARM_KINDS else 0
            return (host_pss(km) + extra) / (1 << 20)
        finally:
            self.stop(km, kc)

    def first_start(self):
        """A user's first kernel, which starts the template: seconds to its kernel_info."""
        stop_template()
        km, kc, elapsed = self.start("isolated")
        self.stop(km, kc)
        return elapsed

    def close(self):
        self.log.close()
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def rotate(items, r):
    """Alternate who goes first from round to round."""
    r %= len(items)
    return items[r:] + items[:r]


def kernel_pid(km):
    prov = km.provisioner
    return getattr(prov, "pid", None) or prov.process.pid


def launcher_pid(km):
    """The launcher of a tcp kernel: the process listening on its shell port (the bridge),
    on every start path (a warm kernel's is the template's child, not the process km
    started)."""
    port = f":{km.shell_port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(port) and fields[3] == "0A":     # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in tree(kernel_pid(km)) + tree(template_pid() or 0):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                pass
    raise RuntimeError(f"no process listens on port {km.shell_port}")


def host_pss(km):
    """Bytes of PSS of the process km started and its descendants (a cold kernel's
    launcher, monitor, init and kernel; a warm one's client on the argv path); none for a
    warm start through the provisioner, which starts no process: what it has on the host
    is the template's children (warm_kernel_pss)."""
    from ns_kernel import warm
    if isinstance(km.provisioner.process, warm.Launcher):
        return 0
    return pss_tree(kernel_pid(km))


def warm_kernel_pss(km, kc):
    """Bytes of PSS of the host processes a warm kernel keeps of its own below the
    template: its sandbox (the monitor and all below it), and its launcher where it stays
    (a TCP bridge; elsewhere it hands the kernel to the monitor and exits)."""
    reply = kc.execute_interactive("", timeout=60, user_expressions={
        "ns": "__import__('os').readlink('/proc/self/ns/pid')"})
    ns = ast.literal_eval(reply["content"]["user_expressions"]["ns"]["data"]["text/plain"])
    # The kernel, PID 2: an ordinary user may not read init's namespace (not dumpable).
    kernel = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if _pid_ns(pid) == ns and _nspid(pid)[-1] == "2")
    own = pss_tree(_parent(_parent(kernel)))
    if km.transport == "tcp":
        own += pss_tree(launcher_pid(km), descend=False)
    return own


def _pid_ns(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _nspid(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("NSpid:")).split()


def _parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def stop_template():
    """Stop the warm template and wait until it no longer listens."""
    from ns_kernel import warm
    warm.stop()
    deadline = time.monotonic() + 10
    while warm.template_pid() and time.monotonic() < deadline:
        time.sleep(0.01)


def template_pss():
    """Bytes of PSS of the warm template and everything it forked (each warm kernel's
    launcher, monitor, init and kernel), 0 without one."""
    pid = template_pid()
    return pss_tree(pid) if pid else 0


def template_pid():
    from ns_kernel import warm
    return warm.template_pid()


def children_map():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = _parent(int(entry))
        except OSError:
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid, kids=None):
    kids = kids if kids is not None else children_map()
    out = [pid]
    for child in kids.get(pid, []):
        out += tree(child, kids)
    return out


def pss_tree(pid, descend=True):
    """Bytes of PSS of pid and all its descendants (the launcher, monitor, init and kernel
    of an isolated kernel; the kernel alone for a plain one); of pid alone if not descend."""
    total = 0
    for p in tree(pid) if descend else [pid]:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid):
    """User and system CPU time pid has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_used():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    import ipykernel
    return (f"{cpu}, {os.cpu_count()} cores, {mem} MB RAM; Linux {platform.release()}; "
            f"Python {platform.python_version()}, ipykernel {ipykernel.__version__}; "
            f"as uid {os.getuid()}")


class Table:
    def __init__(self):
        self.rows = []
        self.failed = []

    def add(self, metric, plain, isolated, unit, target=None, kind="ratio", fmt="{:.3f}"):
        """kind 'ratio': isolated/plain <= target; 'extra': isolated - plain <= target."""
        if kind == "ratio":
            # n/a: a baseline within the noise (e.g. the host memory 4 kernels hold)
            value = isolated / plain if plain > 0 else float("inf")
            shown = f"{value:.2f}x" if plain > 0 else "n/a"
            goal = f"<= {target:.2f}x" if target else ""
        else:
            value = isolated - plain
            shown = f"{value:+.1f} {unit}"
            goal = f"<= +{target:g} {unit}" if target is not None else ""
        ok = "" if target is None else ("yes" if value <= target else "NO")
        if ok == "NO":
            self.failed.append(metric)
        self.rows.append((metric, f"{fmt.format(plain)} {unit}", f"{fmt.format(isolated)} {unit}",
                          shown, goal, ok))

    def note(self, metric, text):
        self.rows.append((metric, "", "", text, "", ""))

    def render(self):
        head = ("metric", "plain", "isolated", "isolated/plain", "target", "met")
        widths = [max(len(str(r[i])) for r in (head, *self.rows)) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(head), sep, *map(line, self.rows)])


def soak(total, alive, log_path):
    """Start and stop `total` default (warm) kernels in a row, `alive` of them at once (each
    new one replaces the oldest), in a socket base of its own, on the argv path and the
    provisioner's by turns (whose launchers this process supervises: warm.Launcher); every
    `alive` starts, what must not grow: the template's own memory, fds and threads, the
    socket dirs, the host's mounts and ns-kernel cgroups (host-wide: other users' kernels
    count too), the processes below the template and our own fds."""
    from ns_kernel import cgroup, socketdir, warm
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ns-kernel-soak-")
    workdir = tempfile.mkdtemp(prefix="ns-kernel-bench-wd-")
    os.chmod(workdir, 0o777)
    kinds = Kinds()
    bench = Bench(kinds, workdir, log_path)
    base = socketdir.default_base()
    paths = [kind for kind in ("isolated", "provisioner") if kind in kinds]

    def sample(started):
        pid = warm.template_pid()
        time.sleep(0.5)     # the children it forked for that connection leave
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in f if "kB" in line}
        private = (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024
        cgroups = sum(name.startswith("ns-kernel-") for mounts in cgroup.hierarchies().values()
                      for mount in mounts[:1] for _, dirs, _ in os.walk(mount) for name in dirs)
        with open("/proc/self/mountinfo") as f:
            mounts = len(f.readlines())
        return (started, f"{kb['Rss'] / 1024:.1f}", f"{private:.1f}",
                len(os.listdir(f"/proc/{pid}/fd")),
                len(os.listdir(f"/proc/{pid}/task")), len(tree(pid)) - 1,
                len(os.listdir(base)), mounts, cgroups, len(os.listdir("/proc/self/fd")))

    head = ("started", "template RSS MB", "template private MB", "template fds", "template threads",
            "procs below template", "socket base entries", "host mounts", "ns-kernel cgroups",
            "bench fds")
    print(" | ".join(head), flush=True)
    running = []
    t0 = time.monotonic()
    try:
        for i in range(1, total + 1):
            km, kc, _ = bench.launch(paths[i % len(paths)])
            bench.wait_ready(kc)
            running.append((km, kc))
            if len(running) > alive:
                bench.stop(*running.pop(0))
            if i % alive == 0 or i == total:
                print(" | ".join(map(str, sample(i))), flush=True)
        while running:
            bench.stop(*running.pop(0))
        time.sleep(1)
        print(" | ".join(map(str, sample("all stopped"))), flush=True)
        print(f"{total} kernels, {alive} alive, in {time.monotonic() - t0:.0f} s")
    finally:
        for km, kc in running:
            bench.stop(km, kc)
        stop_template()
        bench.close()
        kinds.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(os.environ["XDG_RUNTIME_DIR"], ignore_errors=True)


def leftovers(before):
    """Processes of ours still running: the bench must leave nothing behind."""
    now = set(tree(os.getpid()))
    return sorted(now - before - {os.getpid()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, few samples, small payloads, 4 kernels")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; quick: 1)")
    parser.add_argument("--json", help="also write the raw samples to this file")
    parser.add_argument("--only", choices=["proxy", "start"], help="measure these rows alone")
    parser.add_argument("--log", default=os.path.join(tempfile.gettempdir(),
                                                      f"ns-kernel-bench-{os.getuid()}.log"),
                        help="the kernels' own output goes here (default: %(default)s)")
    parser.add_argument("--soak", type=int, metavar="N",
                        help="instead: start and stop N warm kernels in a row (see soak())")
    parser.add_argument("--alive", type=int, default=64, help="--soak: kernels alive at once")
    args = parser.parse_args(argv)
    if args.soak:
        return soak(args.soak, args.alive, args.log)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 5)
    n_rtt = 20 if quick else 500
    out_mb, display_mb = (4, 2) if quick else (100, 20)
    n_scale = 4 if quick else 32

    workdir = tempfile.mkdtemp(prefix="ns-kernel-bench-wd-")
    os.chmod(workdir, 0o777)
    kinds = Kinds()
    bench = Bench(kinds, workdir, args.log)
    before = set(tree(os.getpid()))
    table = Table()
    raw = {"machine": machine(), "rounds": rounds}
    print(f"machine: {raw['machine']}", flush=True)
    try:
        if args.only == "start":
            start_rows(bench, kinds, table, raw, rounds)
        else:
            if args.only != "proxy":
                general(bench, kinds, table, raw, quick, rounds, n_rtt, out_mb, display_mb,
                        n_scale)
            proxy_rows(bench, table, raw, quick, rounds, n_rtt)
    finally:
        stop_template()
        bench.close()
        kinds.close()
        time.sleep(0.5)
        left = leftovers(before)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table.render())
    print(f"\n{rounds} round(s); machine: {raw['machine']}; kernels' log: {bench.log_path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    if left:
        print(f"bench: processes left behind: {left}", file=sys.stderr)
        return 2
    if table.failed:
        print(f"targets not met: {', '.join(table.failed)}")
    return 0


def proxy_rows(bench, table, raw, quick, rounds, n_rtt):
    """The proxy's rows: a kernel with --network proxy against one with --network host."""
    mb = 4 if quick else 200
    took, mem, busy, cpu = bench.downloads(rounds, mb, n_rtt)
    raw.update(download=took, launcher_pss_mb=mem, rtt_downloading=busy,
               launcher_cpu_s_per_gb=cpu)
    # Throughput: the ratio of times, inverted, is proxy/host throughput.
    table.add(f"download {mb} MB, proxy (vs --network host)",
              statistics.median(took["host"]), statistics.median(took["proxy"]), "s",
              1 / 0.9)
    table.add("launcher PSS, proxy (vs --network host)", mem["host"], mem["proxy"], "MB",
              kind="extra", fmt="{:.1f}")
    table.add("launcher CPU per GB, proxy (vs --network host)", cpu["host"],
              cpu["proxy"], "s", kind="extra", fmt="{:.3f}")
    ms = lambda xs, q: pct(xs, q) * 1000
    table.add("round trip p50 while downloading, proxy (vs host)", ms(busy["host"], .5),
              ms(busy["proxy"], .5), "ms", fmt="{:.2f}")
    table.add("round trip p99 while downloading, proxy (vs host)", ms(busy["host"], .99),
              ms(busy["proxy"], .99), "ms", fmt="{:.2f}")


def start_rows(bench, kinds, table, raw, rounds):
    """The start rows: a user's first kernel, then each kind against a plain kernel."""
    iso = [k for k in ISOLATED if k in kinds]
    raw["first start"] = [bench.first_start() for _ in range(rounds)]
    # The rows below show the steady state: the template runs.
    starts = bench.starts(["plain", *iso, "exec", "nofilter"], rounds)
    raw["start"] = starts
    plain_start = statistics.median(starts["plain"])
    labels = {"isolated": "start, default (warm), argv", "provisioner":
              "start, default (warm), provisioner", "cold": "start, --cold, argv",
              "exec": "start, argv, --no-prestart", "nofilter": "start, argv, --seccomp off"}
    for kind in iso:
        table.add(labels[kind], plain_start, statistics.median(starts[kind]), "s",
                  0.25 if kind in WARM_KINDS else 1.05)
    table.add("start, a user's first kernel (starts the template)", plain_start,
              statistics.median(raw["first start"]), "s")
    for kind in ("exec", "nofilter"):
        table.add(labels[kind], plain_start, statistics.median(starts[kind]), "s")
    for kind, why in kinds.missing.items():
        table.note(labels[kind], f"missing: {why}")
    for label, code in (("shutdown", TRIVIAL), ("shutdown, a child alive", CHILD_CODE)):
        took = bench.shutdowns(["plain", "isolated"], rounds, code)
        raw[label] = took
        table.add(label, statistics.median(took["plain"]), statistics.median(took["isolated"]),
                  "s")


def general(bench, kinds, table, raw, quick, rounds, n_rtt, out_mb, display_mb, n_scale):
    """Every row but the proxy's."""
    start_rows(bench, kinds, table, raw, rounds)
    print(table.render(), flush=True)
    iso = [k for k in ISOLATED if k in kinds]

    lanes = {"plain tcp": ("plain", "tcp"), "bridge": ("isolated", "tcp"),
             "plain ipc": ("plain", "ipc"), "direct ipc": ("isolated", "ipc"),
             "bridge, --seccomp off": ("nofilter", "tcp"), "bridge, --cold": ("cold", "tcp")}
    if "provisioner" in kinds:      # its connection is ipc whatever is asked
        lanes["provisioner"] = ("provisioner", "tcp")
    rtt, out, disp, mem = bench.latency_and_output(lanes, rounds, n_rtt, out_mb, display_mb)
    raw.update(rtt=rtt, output=out, display=disp, pss_mb=mem)
    ms = lambda xs, q: pct(xs, q) * 1000
    for label, base, target in (("bridge", "plain tcp", 1.15),
                                ("direct ipc", "plain ipc", 1.05),
                                ("bridge, --cold", "plain tcp", 1.15),
                                ("bridge, --seccomp off", "plain tcp", None)):
        table.add(f"round trip p50, {label}", ms(rtt[base], .5), ms(rtt[label], .5), "ms",
                  target, fmt="{:.2f}")
        table.add(f"round trip p99, {label}", ms(rtt[base], .99), ms(rtt[label], .99), "ms",
                  fmt="{:.2f}")
    for label, base in (("bridge", "plain tcp"), ("direct ipc", "plain ipc")):
        table.add(f"print {out_mb} MB, {label}", statistics.median(out[base]),
                  statistics.median(out[label]), "s", 1.05)
        table.add(f"display {display_mb} MB, {label}", statistics.median(disp[base]),
                  statistics.median(disp[label]), "s")
    served = sum(kind in WARM_KINDS for kind, _ in lanes.values())
    table.add(f"memory PSS per kernel (template over {served})", mem["plain tcp"],
              mem["bridge"], "MB", 5, kind="extra", fmt="{:.1f}")
    if "provisioner" in mem:
        table.add(f"memory PSS per kernel, provisioner (template over {served})",
                  mem["plain ipc"], mem["provisioner"], "MB", 5, kind="extra", fmt="{:.1f}")
    raw["pss_mb alone"] = {kind: bench.alone(kind) for kind in ("plain", "isolated")}
    table.add("memory PSS, one kernel alone (whole template)", raw["pss_mb alone"]["plain"],
              raw["pss_mb alone"]["isolated"], "MB", 5, kind="extra", fmt="{:.1f}")
    table.add("memory PSS per kernel, --cold", mem["plain tcp"], mem["bridge, --cold"],
              "MB", 5, kind="extra", fmt="{:.1f}")

    scale = {}
    for r in range(1 if quick else 2):
        for kind in rotate(["plain", *iso], r):
            scale.setdefault(kind, []).append(bench.scale(kind, n_scale))
    raw["scale"] = scale
    med = lambda kind, i: statistics.median(s[i] for s in scale[kind])
    for kind in iso:
        suffix = {"isolated": "", "provisioner": ", provisioner", "cold": ", --cold"}[kind]
        table.add(f"{n_scale} starts at once{suffix}", med("plain", 0), med(kind, 0), "s",
                  0.30 if kind in WARM_KINDS else 1.10)
        table.add(f"{n_scale} kernels: host memory held{suffix}", med("plain", 1),
                  med(kind, 1), "MB", fmt="{:.0f}")
        table.add(f"{n_scale} kernels: summed PSS{suffix}", med("plain", 2),
                  med(kind, 2), "MB", fmt="{:.0f}")


if __name__ == "__main__":
    # A SIGTERM (a test's timeout, a user's kill) unwinds like Ctrl-C: the finally blocks
    # stop the kernels and the download server and remove the temp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
