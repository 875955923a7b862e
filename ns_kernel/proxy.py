"""`--network proxy`: the kernel's one way out, an HTTP proxy the launcher runs for it.

The kernel still has only `lo`. Init binds 127.0.0.1:PORT in the kernel's network namespace
and hands the listening socket up to the launcher (sandbox.py), which accepts on it from the
host's namespace: a socket stays in the namespace it was made in, whoever holds it. So no
relay runs inside, no socket file joins the kernel-writable socket dir, and only this
kernel's processes can connect to its proxy (another kernel's 127.0.0.1 is its own).
HTTP_PROXY and the rest point the kernel's clients at it (plan.py).

Per connection: read the request (CONNECT host:port, or a plain-HTTP request in absolute
form); check the port (HTTP(S) only: CONNECT to 443, plain HTTP to 80, another port only
where an --allow entry names it) and the name against --deny and --allow before looking it
up (a refused name is never resolved, so it cannot carry data out through DNS); resolve it
once; check each
address (always_denied: the host's own, loopback, private, link-local, metadata ...) and
connect to the first that passes, that very address, never a second lookup (DNS rebinding);
then copy bytes both ways. TLS is not decrypted, and its SNI is not compared with the
CONNECT host: what is checked is the address connected to; a CDN that routes by SNI would
route by the Host header inside TLS too, which no proxy sees without decrypting.

Threads in the launcher, one per connection (at most MAX_CONNECTIONS): the ZMQ relay runs in
the launcher's main thread and a kernel that floods its proxy only waits for its own.
"""
import dataclasses
import errno
import fnmatch
import ipaddress
import os
import re

from . import output

PORT = 3128                 # inside the kernel's namespace: its own, so always free
MAX_CONNECTIONS = 64        # per kernel, at once; more wait in the listen backlog
LOG_BURST = 100             # decisions logged one a line at once,
LOG_RATE = 1                # then this many a second; the rest are counted
MAX_HEAD = 64 << 10
HEAD_TIMEOUT = 30.0         # to send the request head
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 1.0         # for open connections to end and log when the kernel has gone
CHUNK = 1 << 20             # per splice(2), and each pipe's size when the host allows

# The ports a request may go to unless an --allow entry names another: HTTP(S) only. A
# tunnel to any port would carry ssh or anything else, and a plain-HTTP request is a
# tunnel too once its head is sent (the proxy relays the rest as bytes).
CONNECT_PORT = 443
HTTP_PORT = 80
PORTS_SAID = (f"CONNECT goes to port {CONNECT_PORT} and plain HTTP to {HTTP_PORT} unless "
              "--allow names another")


def default_port(method):
    """The one port a request of this method may go to when no entry names a port."""
    return CONNECT_PORT if method == "CONNECT" else HTTP_PORT


PRESETS = {
    "pypi": ("pypi.org:443", "files.pythonhosted.org:443"),
    "conda": ("conda.anaconda.org:443", "repo.anaconda.com:443"),
    "github": ("github.com:443", "*.github.com:443", "*.githubusercontent.com:443"),
    "huggingface": ("huggingface.co:443", "*.huggingface.co:443", "*.hf.co:443"),
}

# Where the host's and its networks' own services live: never reached unless the admin
# names the exact address. A table, not ipaddress's is_global, whose contents change between
# Python versions. Documentation ranges (TEST-NET-1/2/3, 2001:db8::/32) are not on it: they
# hold no host service, and some networks do use them (this project's CI resolves pypi.org
# to 203.0.113.80). The host's own addresses, public ones included, are refused besides
# (is_local).
ALWAYS_DENIED = tuple((ipaddress.ip_network(net), kind) for net, kind in (
    ("0.0.0.0/8", "'this host'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.169.254/32", "cloud metadata"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF special-purpose"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "deprecated IPv4-compatible"),
    ("100::/64", "discard-only"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "local-use NAT64"),
))
NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
PATTERN = re.compile(r"(\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*)")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One --allow/--deny entry: a name pattern (`*`, `*.github.com`, `pypi.org`) or an
    exact address, with a port or None: in --allow the method's default port (80 or 443)
    only, in --deny every port."""
    name: str = ""
    address: object = None      # ipaddress.IPv4Address / IPv6Address
    port: int = None

    def __str__(self):
        host = self.name or (f"[{self.address}]" if self.address.version == 6
                             else str(self.address))
        return f"{host}:{self.port}" if self.port else host

    def matches(self, host, port, address=None, default=None):
        """Whether the entry names this request: a pattern the host name, an address the
        address connected to (or, before resolving, the host when it is that literal).
        default: the only port an entry without one names (an --allow entry: the
        method's); None: it names every port (a --deny entry)."""
        wanted = self.port if self.port is not None else default
        if wanted is not None and wanted != port:
            return False
        return self.names(host, address)

    def names(self, host, address=None):
        """Whether the entry names this host (or address), at whatever port."""
        if self.address is not None:
            return self.address == (address if address is not None else literal(host))
        return fnmatch.fnmatchcase(host, self.name)


@dataclasses.dataclass(frozen=True)
class Policy:
    allow: tuple = ()     # of Entry; empty: the public internet, at the default ports
    deny: tuple = ()

    @classmethod
    def parse(cls, allow=(), deny=()):
        return cls(parse_entries(allow, "--allow"), parse_entries(deny, "--deny"))

    def describe(self):
        allowed = ", ".join(map(str, self.allow)) if self.allow else "the public internet"
        denied = f" except {', '.join(map(str, self.deny))}" if self.deny else ""
        # Said only when an entry leaves its port to the default (a preset's say 443).
        ports = f"{CONNECT_PORT} for CONNECT, {HTTP_PORT} for plain HTTP"
        if not self.allow:
            allowed += f" ({ports})"
        elif any(e.port is None for e in self.allow):
            allowed += f" (without a port: {ports})"
        return f"{allowed}{denied}"


def parse_entries(items, option):
    """Entries of items (each may hold several, comma-separated; presets expanded);
    ValueError naming the bad one."""
    entries = []
    for item in items:
        for word in filter(None, (w.strip().lower() for w in item.split(","))):
            for text in PRESETS.get(word, (word,)):
                entries.append(parse_entry(text, option))
    return tuple(entries)


def parse_entry(text, option):
    def bad(why):
        return ValueError(f"{option} {text!r}: {why} (HOST[:PORT], *.DOMAIN, an address, "
                          f"or a preset: {', '.join(sorted(PRESETS))})")
    try:
        host, port = split_host_port(text, None)
    except ValueError as exc:
        raise bad(str(exc)) from None
    address = literal(host)
    if address is not None:
        return Entry(address=address, port=port)
    if not PATTERN.fullmatch(host):
        raise bad("not a host name, *.domain or address")
    return Entry(name=host, port=port)


def split_host_port(text, default):
    """(host lowercased, without brackets or a trailing dot; port) of HOST[:PORT] or
    [V6][:PORT]; ValueError if it is neither."""
    text = text.strip().lower()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("unbalanced [ ]")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None     # a name, an IPv4 or a bare IPv6 address
    if port is None or port == "":
        if port == "":
            raise ValueError("empty port")
        port = default
    else:
        # ASCII digits only: int() also reads other scripts' ('４４３').
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"bad port {port!r}")
        port = int(port)
    host = host.rstrip(".")
    if not host:
        raise ValueError("no host")
    return host, port


def literal(host):
    """The address a host string is in strict notation (dotted quad, IPv6), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def inner_ipv4(address):
    """The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96,
    6to4 2002::/16), else None: a connection to it may reach that IPv4 host."""
    if address.version != 6:
        return None
    inner = address.ipv4_mapped or address.sixtofour
    if inner is None and address in NAT64:
        inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return inner


def always_denied(address):
    """What this address is ('a loopback address') if it is one of ALWAYS_DENIED, else ''.
    IPv4 inside IPv6 is judged as that IPv4."""
    inner = inner_ipv4(address)
    if inner is not None:
        what = always_denied(inner)
        if what:
            return f"{what} ({inner} in IPv6 form)"
    for net, kind in ALWAYS_DENIED:
        if address.version == net.version and address in net:
            return f"a {kind} address"
    return ""


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def decide(policy, host, port, address=None, local=False, method="CONNECT"):
    """Why this request is refused, or '' if it may go. First (address None) on the name
    and port alone, before any lookup; then on each address the name resolved to. local:
    the address is one of the host's own (the proxy's is_local). method: the request's;
    an --allow entry without a port names only its default port (default_port)."""
    # An entry naming an IPv4 address names it in every IPv6 form too.
    inner = inner_ipv4(address) if address is not None else None
    forms = [address] + ([inner] if inner else [])
    if any(e.matches(host, port, a) for e in policy.deny for a in forms):
        return f"{host} is on this kernel's denylist (--deny)"
    default = default_port(method)
    if address is None:
        if policy.allow and not any(e.matches(host, port, default=default)
                                    for e in policy.allow):
            named = any(e.names(host) for e in policy.allow)
            if not named:
                return f"{host} is not on this kernel's allowlist (--allow)"
            return (f"{hostport(host, port)} is not on this kernel's allowlist (--allow)"
                    + ("" if port == default else f": {PORTS_SAID}"))
        if not policy.allow and port != default:
            return (f"{hostport(host, port)} is not a port this kernel's proxy opens: "
                    f"{PORTS_SAID}")
        return ""
    what = always_denied(address) or ("one of the host's own addresses" if local else "")
    if what and not any(e.address is not None and e.matches(host, port, a, default)
                        for e in policy.allow for a in forms):
        shown = host if literal(host) == address else f"{host} ({address})"
        return f"{shown} is {what}, refused unless --allow names that exact address"
    return ""


def hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BadRequest(Exception):
    """The client's request is not one a proxy serves; str(): why, for a 400."""


def parse_head(head):
    """(method, host, port, what to send upstream first or None for CONNECT) of a request
    head (bytes up to the blank line)."""
    try:
        text = head.decode("latin-1")
        line, *headers = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise BadRequest("not an HTTP request") from None
    # A method is a short token: anything else would only lengthen the log line.
    if (not version.startswith("HTTP/1.") or not method.isascii() or not method.isalpha()
            or len(method) > 20):
        raise BadRequest("not an HTTP/1 request")
    if method == "CONNECT":
        try:
            host, port = split_host_port(target, None)
        except ValueError as exc:
            raise BadRequest(f"CONNECT {target}: {exc}") from None
        if port is None:
            raise BadRequest(f"CONNECT {target}: no port")
        upstream = None
    else:
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() != "http":
            raise BadRequest(f"{method} {target[:100]}: this is a proxy; give an http:// URL "
                             "(https goes through CONNECT)")
        authority, slash, path = rest.partition("/")
        try:
            host, port = split_host_port(authority.rpartition("@")[2], 80)
        except ValueError as exc:
            raise BadRequest(f"{target[:100]}: {exc}") from None
        # One request per connection: a next one may be for another host. The Host header
        # is the URI's, as RFC 9112 (3.2.2) has a proxy make it: the server is asked for
        # the host that was checked, not another one it also serves.
        kept = [h for h in headers if h and h.split(":", 1)[0].strip().lower() not in
                ("host", "proxy-connection", "proxy-authorization", "connection",
                 "keep-alive")]
        named = hostport(host, port) if port != HTTP_PORT else (
            f"[{host}]" if ":" in host else host)
        upstream = "\r\n".join([f"{method} {slash}{path} {version}", f"Host: {named}",
                                *kept, "Connection: close", "", ""]).encode("latin-1")
    if literal(host) is None and not NAME.fullmatch(host) or len(host) > 253:
        raise BadRequest(f"{host[:100]!r} is not a host name or address")
    return method, host, port, upstream


def is_local(address):
    """Whether the address is one of the host's own (its public ones too): only a local
    address can be bound. Unsure (another error) counts as local: refuse."""
    import socket
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


class Proxy:
    """The proxy of one kernel, on the listening socket init handed up."""

    def __init__(self, listener, policy, who, log):
        import threading
        self.listener = listener
        self.policy = policy
        self.who = who          # "kernel 3f2a9c1e"
        self.log = log          # log(line): one line to the server's log
        # The kernel decides how many requests it makes: its lines in the log (the host's
        # disk, the launcher's CPU) are budgeted, and what was left out is counted.
        self.budget = output.Budget(LOG_BURST, LOG_RATE)
        self.budget_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.active = {}        # client socket -> (its thread, [its server socket])
        self.thread = threading.Thread(target=self._accept, name="ns-kernel proxy",
                                       daemon=True)

    def _say(self, line):
        with self.budget_lock:
            if not self.budget.take(1):
                return
            if self.budget.over:
                self._say_left_out()
            self.log(line)

    def _say_left_out(self):
        self.log(f"ns-kernel: {self.who} proxy: {self.budget.over} more requests left out of "
                 f"this log (over {LOG_BURST} lines at once, then {LOG_RATE} a second)")
        self.budget.over = 0

    def start(self):
        self._say(f"ns-kernel: {self.who} proxy on 127.0.0.1:{PORT} inside: "
                 f"{self.policy.describe()}")
        self.thread.start()
        return self

    def close(self):
        """Stop accepting; end the connections still open, so that each says its line."""
        import socket
        import time
        active = list(self.active.items())
        # Wakes accept(), and every relay, also one whose server would never close.
        for sock in (self.listener, *(s for client, (_, server) in active
                                      for s in (client, server[0]) if s)):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.listener.close()
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for _, (thread, _) in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.budget_lock:
            if self.budget.over:
                self._say_left_out()

    def _accept(self):
        import threading
        while True:
            self.slots.acquire()
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = [None]     # the upstream socket, once connected
            thread = threading.Thread(target=self._serve, args=(client, server), daemon=True)
            self.active[client] = thread, server
            thread.start()

    def _serve(self, client, connected):
        try:
            with client:
                self._handle(client, connected)
        finally:
            self.active.pop(client, None)
            self.slots.release()

    def _handle(self, client, connected):
        """Serve one request; connected[0]: the server socket, for close()."""
        import socket
        client.settimeout(HEAD_TIMEOUT)
        try:
            head, rest = read_head(client)
            method, host, port, upstream = parse_head(head)
        except (BadRequest, OSError) as exc:
            why = str(exc) if isinstance(exc, BadRequest) else "no complete request"
            self._refuse(client, 400, "?", 0, "?", why)
            return
        reason = decide(self.policy, host, port, method=method)
        if reason:
            self._refuse(client, 403, host, port, method, reason)
            return
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            self._refuse(client, 502, host, port, method, f"cannot resolve {host}: "
                         f"{getattr(exc, 'strerror', None) or exc}")
            return
        server, address, refusals, failures = None, None, [], []
        for family, kind, proto, _, sockaddr in dict.fromkeys(
                (f, k, p, c, s) for f, k, p, c, s in found):
            address = ipaddress.ip_address(sockaddr[0])
            inner = inner_ipv4(address)
            local = is_local(address) or (inner is not None and is_local(inner))
            why = decide(self.policy, host, port, address, local, method)
            if why:
                refusals.append(why)
                continue
            server = socket.socket(family, kind, proto)
            server.settimeout(CONNECT_TIMEOUT)
            try:
                server.connect(sockaddr)    # that very address: no second lookup
                connected[0] = server
                break
            except OSError as exc:
                failures.append(f"{address}: {exc.strerror or exc}")
                server.close()
                server = None
        if server is None:
            if failures:
                self._refuse(client, 502, host, port, method,
                             f"cannot connect to {hostport(host, port)} ({'; '.join(failures)})")
            else:
                self._refuse(client, 403, host, port, method, refusals[0])
            return
        with server:
            sent = received = 0
            try:
                if upstream is None:
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    server.sendall(upstream)
                    sent += len(upstream)
                if rest:
                    server.sendall(rest)
                    sent += len(rest)
                counts = relay(client, server)
                sent, received = sent + counts[0], counts[1]
            except OSError:
                pass
            self._say(f"ns-kernel: {self.who} proxy: allowed {method} {hostport(host, port)} "
                     f"({address}): {sent} bytes sent, {received} received")

    def _refuse(self, client, status, host, port, method, why):
        # What the client sent (a bad request's target) may hold line breaks: one line in
        # the log, one in the status line.
        why = "".join(c if c.isprintable() else "?" for c in why)[:500]
        self._say(f"ns-kernel: {self.who} proxy: refused {method} {hostport(host, port)}: {why}")
        # The reason phrase carries it too: a failed CONNECT shows only that (pip, requests:
        # "Tunnel connection failed: 403 ns-kernel: ...").
        line = f"ns-kernel: {why}"
        body = (line + "\n").encode("utf-8", "replace")
        try:
            client.sendall(f"HTTP/1.1 {status} {line}\r\nContent-Type: text/plain; "
                           f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: "
                           "close\r\n\r\n".encode("utf-8", "replace") + body)
        except OSError:
            pass


def read_head(sock):
    """(head, what came after it) of a request; OSError if it does not come whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise BadRequest(f"request head longer than {MAX_HEAD} bytes")
        chunk = sock.recv(MAX_HEAD)
        if not chunk:
            raise OSError(errno.ECONNRESET, "closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def relay(client, server):
    """Copy bytes both ways until both sides are done; (client->server, server->client).
    By splice(2) through a pipe per direction: the bytes never enter Python, which on a
    loaded host is most of what a proxy costs."""
    import fcntl
    import selectors
    import socket
    client.settimeout(None)
    server.settimeout(None)
    counts = {client: 0, server: 0}
    peers = {client: server, server: client}
    pipes = {sock: os.pipe2(os.O_CLOEXEC) for sock in peers}
    try:
        for _, write in pipes.values():
            try:
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, CHUNK)
            except OSError:
                pass        # over /proc/sys/fs/pipe-max-size: the default 64 KiB serves
        with selectors.DefaultSelector() as sel:
            for sock in peers:
                sel.register(sock, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    src = key.fileobj
                    read, write = pipes[src]
                    try:
                        size = os.splice(src.fileno(), write, CHUNK,
                                         flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        size = 0
                    if not size:
                        sel.unregister(src)
                        try:
                            peers[src].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    try:
                        left = size
                        while left:
                            left -= os.splice(read, peers[src].fileno(), left,
                                              flags=os.SPLICE_F_MOVE)
                    except OSError:
                        return counts[client], counts[server]    # that side has gone
                    counts[src] += size
    finally:
        for fds in pipes.values():
            for fd in fds:
                os.close(fd)
    return counts[client], counts[server]
