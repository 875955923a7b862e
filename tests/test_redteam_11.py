"""Red team of issue 11 (the egress proxy) and issue 12 (the bridge's refusal): attacks that
work on main as merged. Each test FAILS while the hole is open; its docstring says the
attack, its impact and a suggested fix. Real kernels, servers on loopback or in a network
namespace of the test's own, no internet."""
import ipaddress
import os

import pytest

from conftest import start_kernel, stop_kernel, write_spec
from test_proxy import ASK, FETCH, logged, own_address, public_server  # noqa: F401 - public_server: a fixture

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


@pytest.mark.skipif(own_address() is None, reason="the host has no IPv4 address toward the outside")
def test_own_and_metadata_addresses_in_nat64_and_6to4_form(workdir, tmp_path):
    """Attack: the kernel asks for the host's own public IPv4 in NAT64 form
    (`[64:ff9b::c000:202]` for 192.0.2.2) or 6to4 form (`[2002:c000:202::]`).
    always_denied() unwraps these only to look the IPv4 up in ALWAYS_DENIED, where a public
    address is not; is_local() then tries to bind the IPv6 form itself, which is not the
    host's: the proxy connects. On a network with NAT64 (IPv6-only or dual-stack clouds
    route 64:ff9b::/96 to a NAT64 gateway by default, AWS among them) that connection comes
    back to the host's public address: every service the host exposes there (the Jupyter
    server, sshd, databases), against docs/network.md's "the host's own addresses, public
    ones included". Here there is no NAT64 route: the proxy tries and gets "No route to
    host" (502) where it should refuse (403). RFC 8215's local-use prefix 64:ff9b:1::/48
    is not unwrapped at all (64:ff9b:1::a00:1 is judged public, not 10.0.0.1).
    Fix: in decide(), judge the embedded IPv4 (mapped, NAT64 /96 and 64:ff9b:1::/48, 6to4)
    with is_local() as well, and refuse it the same way."""
    own = ipaddress.IPv4Address(own_address())
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(own))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(own) << 80))
    metadata = "64:ff9b:1::a9fe:a9fe"     # 169.254.169.254 under the local-use prefix
    spec = write_spec("redteam11-nat64", ["--network", "proxy", "--allow", "*"])
    with open(tmp_path / "server.log", "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(ASK)
            answers = {str(a): k.value(f"ask('CONNECT', '[{a}]:443')", timeout=90)
                       for a in (nat64, sixtofour, metadata)}
        finally:
            stop_kernel(k)
    assert all(status == 403 for status, _ in answers.values()), answers
