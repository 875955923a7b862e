"""The network namespace: a fresh one has only `lo`, and it is down until we raise it; with
network 'proxy', the listener of the kernel's proxy on it (proxy.py)."""
import fcntl
import socket
import struct

from .errors import SetupError

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
