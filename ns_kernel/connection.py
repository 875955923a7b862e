"""Jupyter connection files: read and check the client's, write the inner kernel's.

The inner kernel always speaks ZMQ over `ipc`: its sockets are <socket dir>/k-<port>,
one per channel, with the client's ports as numbers so each maps to one TCP port.
"""
import json
import os

from .errors import SetupError

CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
# CurveZMQ (jupyter_client >= 8.10, transport_encryption auto/required): the kernel's
# server keys, Z85 (40 characters each). The handshake runs end to end, kernel to client:
# the bridge relays its bytes like any other.
CURVE_KEYS = ("curve_publickey", "curve_secretkey")
Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
# What a kernel with Curve keys gets on its command line: see kernel_config.py.
CURVE_CONFIG_ARGV = ("--IPKernelApp.extra_config_file="
                     f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernel_config.py')}")
FIX = "restart the kernel from Jupyter so it writes a fresh connection file"


def read(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SetupError("connection", "read connection file", path, exc.errno, FIX) from None
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise SetupError("connection", f"connection file {path} is not valid JSON ({exc})",
                         hint=FIX) from None
    if not isinstance(info, dict):
        raise SetupError("connection", f"connection file {path} is not a JSON object", hint=FIX)
    return check(info, path)


def check(info, path):
    def bad(what):
        return SetupError("connection", f"connection file {path}: {what}", hint=FIX)
    transport = info.get("transport", "tcp")
    if transport not in ("tcp", "ipc"):
        raise bad(f"unknown transport {transport!r} (expected 'tcp' or 'ipc')")
    for name in CHANNELS:
        port = info.get(name)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise bad(f"{name} is {port!r}, not a port number (1-65535)")
    if len({info[name] for name in CHANNELS}) != len(CHANNELS):
        raise bad("two channels share a port")
    if not isinstance(info.get("ip", "127.0.0.1"), str) or not info.get("ip", "127.0.0.1"):
        raise bad(f"ip is {info.get('ip')!r}, not an address")
    for name in ("key", "signature_scheme"):
        if not isinstance(info.get(name, ""), str):
            raise bad(f"{name} is {info[name]!r}, not a string")
    curve = [name for name in CURVE_KEYS if name in info]
    if curve and len(curve) != len(CURVE_KEYS):
        raise bad(f"{curve[0]} without {(set(CURVE_KEYS) - set(curve)).pop()}")
    for name in curve:
        if not isinstance(info[name], str) or len(info[name]) != 40 or set(info[name]) - Z85:
            raise bad(f"{name} is not a CurveZMQ key (40 characters of Z85)")
    scheme = info.get("signature_scheme", "hmac-sha256")
    if not scheme.startswith("hmac-"):
        raise bad(f"unknown signature_scheme {scheme!r}")
    return dict(info, transport=transport, ip=info.get("ip", "127.0.0.1"))


def inner(info, socket_dir_inside):
    """The connection the inner kernel binds: same keys and ports, ipc in the socket dir."""
    out = {name: info[name] for name in (*CHANNELS, *CURVE_KEYS) if name in info}
    out.update(transport="ipc", ip=f"{socket_dir_inside}/k", key=info.get("key", ""),
               signature_scheme=info.get("signature_scheme", "hmac-sha256"),
               kernel_name=info.get("kernel_name", ""))
    return out


def write(path, info, uid=None, gid=None):
    """Write with 0600 from the start: the key must never be readable by anyone else."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        if uid is not None:
            os.chown(path, uid, gid)
    except OSError as exc:
        raise SetupError("connection", "write connection file", path, exc.errno) from None


def socket_path(socket_dir, port):
    return f"{socket_dir}/k-{port}"
