"""Red team of issue 11 (the egress proxy) and issue 12 (the bridge's refusal): attacks that
work on main as merged. Each test FAILS while the hole is open; its docstring says the
attack, its impact and a suggested fix. Real kernels, servers on loopback or in a network
namespace of the test's own, no internet."""
import os

import pytest

from conftest import start_kernel, stop_kernel, write_spec
from test_proxy import FETCH, logged, public_server  # noqa: F401 - public_server: a fixture

PUBLIC = "198.51.100.254"       # public_server's address: a neighbour, neither host nor private


@pytest.mark.skipif(os.getuid() != 0, reason="makes a network namespace and a veth pair on "
                    "the host (root), as test_proxy.py's public_server does")
def test_denied_address_reached_in_ipv4_mapped_form(public_server, workdir, tmp_path):
    """Attack: the admin denies an address (`--deny 198.51.100.254`, say a LAN service with a
    public address, or a partner's API); the kernel asks for the same address in IPv6 form,
    `http://[::ffff:198.51.100.254]:PORT/` (or CONNECT [::ffff:...]:443). Entry.matches
    compares ipaddress objects: IPv4Address != IPv6Address('::ffff:...'), so --deny does not
    match; always_denied() judges the inner IPv4 (public: passes); the launcher opens an
    AF_INET6 socket to ::ffff:a.b.c.d, which the host kernel sends as IPv4 to that very
    address. A name whose AAAA record is ::ffff:a.b.c.d does the same, against
    docs/network.md's "a denied address also catches every name that resolves to it".
    Impact: every address entry of --deny is bypassed by any kernel, as any user.
    Fix: normalise both sides before comparing (an IPv6 address whose ipv4_mapped is set is
    that IPv4: in literal() and for the resolved address in _handle/decide), and judge
    NAT64/6to4 forms the same way always_denied already does."""
    port = public_server
    log = tmp_path / "server.log"
    spec = write_spec("redteam11-deny", ["--network", "proxy", "--deny", PUBLIC])
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(FETCH)
            plain = k.value(f"fetch('http://{PUBLIC}:{port}/hello.txt')")
            assert plain[0] == 403, plain       # the denial itself works
            mapped = k.value(f"fetch('http://[::ffff:{PUBLIC}]:{port}/hello.txt')")
        finally:
            stop_kernel(k)
    assert mapped[0] == 403, (mapped, logged(k, log))


FLOOD = r'''
import socket
def flood(n):
    refused = 0
    for i in range(n):
        with socket.create_connection(("127.0.0.1", 3128)) as s:
            s.sendall(f"CONNECT n{i}.nowhere.invalid:443 HTTP/1.1\r\n\r\n".encode())
            refused += s.recv(4096).startswith(b"HTTP/1.1 403 ")
    return refused
'''


def test_kernel_cannot_flood_the_server_log(workdir, tmp_path):
    """Attack: the kernel opens its proxy in a loop, each time for a name not on --allow
    (or any refused target). Each refusal is a line in the Jupyter server's log, up to
    ~800 bytes each (the reason is cut at 500 characters, the name at 253), with no
    budget or rate limit: the kernel writes as fast as the launcher can refuse.
    Impact: hostile code fills the disk that holds the server's log (journald, a
    JupyterHub spawner's log file) and buries other users' and kernels' lines; bridge.py
    already says each refusal once for exactly this reason ("another user could flood it"),
    the proxy does not.
    Fix: a per-kernel log budget: say the first N refusals (and each distinct
    reason once), then one "ns-kernel: kernel X proxy: N more requests refused" line per
    interval and at kernel end."""
    n = 2000
    log = tmp_path / "server.log"
    spec = write_spec("redteam11-flood", ["--network", "proxy", "--allow", "pypi"])
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(FLOOD)
            assert k.value(f"flood({n})", timeout=300) == n    # every one refused
        finally:
            stop_kernel(k)
    lines = [line for line in logged(k, log) if line.startswith("refused ")]
    assert len(lines) < n // 10, f"{len(lines)} log lines, {log.stat().st_size} bytes"


def test_one_request_is_one_short_log_line(workdir, tmp_path):
    """Attack: the method of a plain-HTTP request is any run of letters (method.isalpha():
    latin-1 letters too) up to the 64 KiB head limit, and it goes into the log line as is:
    `refused <METHOD> host:port: ...` (and `allowed <METHOD> ...`). _refuse cuts the reason
    at 500 characters but not the method. One request, a 60 KB line in the server's log;
    with the loop above, ~100x the bytes per refusal.
    Impact: the log flood of test_kernel_cannot_flood_the_server_log, amplified; one line
    big enough to break log shippers (journald cuts lines at 48 KiB into several entries,
    syslog at 1-8 KiB).
    Fix: accept only the methods a proxy forwards (a token of at most ~20 ASCII
    letters: RFC 9110 methods), refuse others with 400 before logging, and cut every
    kernel-supplied field of a log line."""
    log = tmp_path / "server.log"
    spec = write_spec("redteam11-method", ["--network", "proxy", "--allow", "pypi"])
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute("import socket\n"
                      "s = socket.create_connection(('127.0.0.1', 3128))\n"
                      "s.sendall(b'X' * 60000 + b' http://n.nowhere.invalid/ HTTP/1.1\\r\\n\\r\\n')\n"
                      "status = s.recv(4096).split(b'\\r\\n')[0]")
            assert k.value("status").startswith(b"HTTP/1.1 4")
        finally:
            stop_kernel(k)
    lengths = [len(line) for line in logged(k, log)]
    assert lengths and max(lengths) <= 1000, lengths
