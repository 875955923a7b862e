"""The network namespace: a fresh one has only `lo`, and it is down until we raise it; with
network 'proxy', the listener of the kernel's proxy on it (proxy.py).

What each value of Sandbox.network means is one row of MODES, which every step that
differs by it reads (plan, sandbox, prestart, seal, launcher, cli, config, doctor): a new
mode is a new row, not a string compared in seven modules.
"""
import fcntl
import socket
import struct
from dataclasses import dataclass

from .errors import SetupError


@dataclass(frozen=True)
class NetworkMode:
    """One value of Sandbox.network, and what it means to each step that differs by it."""
    name: str
    new_netns: bool     # init unshares CLONE_NEWNET (a prestarted interpreter joins it)
    loopback_up: bool   # init raises `lo` in it
    proxy: bool         # the launcher's egress proxy (proxy.py): init's listener at
                        # 127.0.0.1:3128 inside, HTTP_PROXY and the like, Sandbox.proxy_allow
    sysfs: bool         # a fresh /sys: it shows its network namespace's devices, and only
                        # that namespace's owner may mount it (with the host's, nobody)
    scope_abstract_unix: bool   # Landlock keeps the host's abstract unix sockets (X11's,
                                # D-Bus's) out: they live in the host's network namespace
    offline_hint: bool  # offline.py: a `%pip install` says why it cannot reach an index
    debugger: bool      # kernel.json's metadata.debugger: debugpy needs a loopback to listen on
    help: str           # Sandbox.network's help for it
    doctor: str         # what `ns-kernel doctor` says of it ({allowed}: where the proxy goes)


MODES = {mode.name: mode for mode in (
    NetworkMode("loopback", new_netns=True, loopback_up=True, proxy=False, sysfs=True,
                scope_abstract_unix=False, offline_hint=True, debugger=True,
                help="a private network namespace with only `lo`, up; no route out and the "
                     "host's loopback services unreachable.",
                doctor="only lo, up: no way out (%pip cannot reach an index; --network proxy "
                       "gives one)"),
    NetworkMode("none", new_netns=True, loopback_up=False, proxy=False, sysfs=True,
                scope_abstract_unix=False, offline_hint=True, debugger=False,
                help="the same namespace with `lo` down.",
                doctor="only lo, down: no way out, not even to the kernel's own loopback"),
    NetworkMode("proxy", new_netns=True, loopback_up=True, proxy=True, sysfs=True,
                scope_abstract_unix=False, offline_hint=False, debugger=True,
                help="the loopback namespace, plus an HTTP/HTTPS proxy at 127.0.0.1:3128 "
                     "inside (HTTP_PROXY and the like are set) that the launcher runs on the "
                     "host for this kernel alone, going where proxy_allow and proxy_deny say, "
                     "never to the host's own, loopback, private, link-local or metadata "
                     "addresses unless proxy_allow names that exact address.",
                doctor="only lo; HTTP(S) out through the kernel's own proxy (127.0.0.1:3128 "
                       "inside, run by its launcher) to {allowed}; the host's own, loopback, "
                       "private, link-local and metadata addresses refused unless named "
                       "exactly"),
    NetworkMode("host", new_netns=False, loopback_up=False, proxy=False, sysfs=False,
                scope_abstract_unix=True, offline_hint=False, debugger=True,
                help="share the host's network (no isolation of ports or services).",
                doctor="the host's network, its loopback services and LAN included: no "
                       "isolation"),
)}
DEFAULT_MODE = "loopback"

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def bring_up_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            req = struct.pack("16sh14x", b"lo", 0)
            flags = struct.unpack("16sh14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))
        except OSError as exc:
            raise SetupError("net", "ioctl(SIOCSIFFLAGS, lo up)", "", exc.errno) from None


def proxy_listener():
    from .proxy import PORT
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", PORT))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SetupError("net", f"bind tcp 127.0.0.1:{PORT} (proxy)", "", exc.errno) from None
    return sock
