"""`--network proxy`: the policy alone (pure), then real kernels reaching servers of the
test's own on host loopback through their proxies, on every way a kernel starts, and one
%pip install from PyPI itself (the CI reaches PyPI; nothing else here needs the internet).

The servers listen on 127.0.0.2: inside a kernel 127.0.0.1 is its own loopback (NO_PROXY
keeps it direct), so host services named for a kernel have another loopback address."""
import functools
import http.server
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading

import pytest

from conftest import ALL_PATHS, make_wheel, start_kernel, start_paths, stop_kernel, write_spec
from ns_kernel import proxy
from ns_kernel.proxy import BadRequest, Policy, always_denied, decide, parse_head

SERVER = "127.0.0.2"


def ip(text):
    return ipaddress.ip_address(text)


# -- the policy, pure ---------------------------------------------------------------------

PORTS = "CONNECT goes to port 443 and plain HTTP to 80 unless --allow names another"


@pytest.mark.pure
def test_names_allow_and_deny():
    policy = Policy.parse(["pypi, *.github.com", "example.org:8080"], ["evil.github.com"])
    assert decide(policy, "pypi.org", 443) == ""
    assert decide(policy, "files.pythonhosted.org", 443) == ""
    assert decide(policy, "pypi.org", 80) == \
        "pypi.org:80 is not on this kernel's allowlist (--allow): " + PORTS
    assert decide(policy, "api.github.com", 443) == ""
    assert decide(policy, "a.b.github.com", 443) == ""
    assert decide(policy, "github.com", 443) == \
        "github.com is not on this kernel's allowlist (--allow)"
    assert decide(policy, "evil.github.com", 443) == \
        "evil.github.com is on this kernel's denylist (--deny)"
    assert decide(policy, "example.org", 8080) == ""
    assert decide(policy, "files.example.com", 443) == \
        "files.example.com is not on this kernel's allowlist (--allow)"
    # No allowlist: the public internet; a public address passes.
    assert decide(Policy(), "files.example.com", 443) == ""
    assert decide(Policy(), "files.example.com", 443, ip("151.101.0.223")) == ""
    # A denied address catches every name resolving to it.
    deny = Policy.parse([], ["151.101.0.223"])
    assert decide(deny, "pypi.org", 443, ip("151.101.0.223")) == \
        "pypi.org is on this kernel's denylist (--deny)"


@pytest.mark.pure
@pytest.mark.parametrize("address, what", [
    ("127.0.0.1", "a loopback address"), ("127.8.9.10", "a loopback address"),
    ("::1", "a loopback address"), ("0.0.0.0", "a 'this host' address"),
    ("10.1.2.3", "a private address"), ("172.31.0.1", "a private address"),
    ("192.168.1.1", "a private address"), ("100.64.0.1", "a shared (CGNAT) address"),
    ("169.254.169.254", "a cloud metadata address"), ("169.254.1.1", "a link-local address"),
    ("fd00:ec2::254", "a private (unique local) address"), ("fe80::1", "a link-local address"),
    ("224.0.0.1", "a multicast address"), ("255.255.255.255", "a reserved address"),
    ("::ffff:127.0.0.1", "a loopback address (127.0.0.1 in IPv6 form)"),
    ("::ffff:169.254.169.254", "a cloud metadata address (169.254.169.254 in IPv6 form)"),
    ("64:ff9b::a00:1", "a private address (10.0.0.1 in IPv6 form)"),
    ("2002:c0a8:101::", "a private address (192.168.1.1 in IPv6 form)"),
    ("::7f00:1", "a deprecated IPv4-compatible address"),
])
def test_always_denied(address, what):
    assert always_denied(ip(address)) == what
    refused = decide(Policy.parse(["*"]), "name.example", 80, ip(address))
    assert refused == f"name.example ({ip(address)}) is {what}, refused unless --allow " \
                      "names that exact address"


@pytest.mark.pure
@pytest.mark.parametrize("address", ["151.101.0.223", "2a04:4e42::223", "203.0.113.80",
                                     "198.51.100.7", "192.0.2.1", "2001:db8::1"])
def test_public_and_documentation_addresses_pass(address):
    # Documentation ranges hold no host service (and this CI resolves pypi.org into one).
    assert always_denied(ip(address)) == ""
    assert decide(Policy.parse(["*"]), "name.example", 443, ip(address)) == ""


@pytest.mark.pure
def test_only_the_exact_address_opens_a_denied_one():
    policy = Policy.parse(["*", "127.0.0.2:8080", "[fd00::5]"])
    assert decide(policy, "127.0.0.2", 8080, ip("127.0.0.2")) == ""
    assert decide(policy, "0x7f000002", 8080, ip("127.0.0.2")) == ""    # the same address
    assert "loopback" in decide(policy, "127.0.0.2", 8081, ip("127.0.0.2"))
    assert "loopback" in decide(policy, "127.0.0.3", 8080, ip("127.0.0.3"))
    # Its IPv6 forms are that address too (and a --deny of it catches them: test_denied_address_reached_in_ipv4_mapped_form).
    assert decide(policy, "::ffff:127.0.0.2", 8080, ip("::ffff:127.0.0.2")) == ""
    assert "IPv6 form" in decide(policy, "::ffff:127.0.0.3", 8080, ip("::ffff:127.0.0.3"))
    assert decide(policy, "fd00::5", 443, ip("fd00::5")) == ""
    # Without a port, the exact address at the default ports only.
    assert "private" in decide(policy, "fd00::5", 22, ip("fd00::5"))
    # A name is never enough, whatever the list says.
    named = Policy.parse(["localhost", "*.internal"])
    assert decide(named, "localhost", 80, method="GET") == ""
    assert decide(named, "localhost", 80, ip("127.0.0.1"), method="GET") == \
        "localhost (127.0.0.1) is a loopback address, refused unless --allow names that " \
        "exact address"
    # The host's own addresses, public ones too.
    assert decide(Policy(), "me.example", 80, ip("198.51.100.9"), local=True) == \
        "me.example (198.51.100.9) is one of the host's own addresses, refused unless " \
        "--allow names that exact address"
    # Before resolving, an address entry names only its own strict literal.
    exact = Policy.parse(["127.0.0.2:8080"])
    assert decide(exact, "127.0.0.2", 8080) == ""
    assert decide(exact, "2130706434", 8080) == \
        "2130706434 is not on this kernel's allowlist (--allow)"


@pytest.mark.pure
@pytest.mark.parametrize("allow, deny, method, host, port, why", [
    # Attack (issue 22, item 5): with no --allow the proxy tunnelled any port, ssh's too.
    ((), (), "CONNECT", "ssh.example", 22, "ssh.example:22 is not a port this kernel's "
     "proxy opens: " + PORTS),
    ((), (), "GET", "ssh.example", 22, "ssh.example:22 is not a port this kernel's proxy "
     "opens: " + PORTS),
    ((), (), "CONNECT", "h.example", 443, ""), ((), (), "GET", "h.example", 80, ""),
    # Each method its own port: plain HTTP to 443, CONNECT to 80 are not HTTP(S) on them.
    ((), (), "CONNECT", "h.example", 80, "h.example:80 is not a port this kernel's proxy "
     "opens: " + PORTS),
    ((), (), "GET", "h.example", 443, "h.example:443 is not a port this kernel's proxy "
     "opens: " + PORTS),
    # Every name, a bare name, an address, a preset: the default ports only.
    (("*",), (), "CONNECT", "h.example", 22, "h.example:22 is not on this kernel's "
     "allowlist (--allow): " + PORTS),
    (("*",), (), "CONNECT", "h.example", 443, ""),
    (("files.example.edu",), (), "CONNECT", "files.example.edu", 8443,
     "files.example.edu:8443 is not on this kernel's allowlist (--allow): " + PORTS),
    (("files.example.edu",), (), "GET", "files.example.edu", 80, ""),
    (("198.51.100.7",), (), "CONNECT", "198.51.100.7", 22, "198.51.100.7:22 is not on this "
     "kernel's allowlist (--allow): " + PORTS),
    (("[2001:db8::1]",), (), "CONNECT", "2001:db8::1", 22, "[2001:db8::1]:22 is not on "
     "this kernel's allowlist (--allow): " + PORTS),
    (("pypi",), (), "CONNECT", "pypi.org", 22, "pypi.org:22 is not on this kernel's "
     "allowlist (--allow): " + PORTS),
    # A port named opens that port, for either method.
    (("*.example.edu:8443",), (), "CONNECT", "a.example.edu", 8443, ""),
    (("*.example.edu:8443",), (), "GET", "a.example.edu", 8443, ""),
    (("*.example.edu:8443",), (), "CONNECT", "a.example.edu", 443,
     "a.example.edu:443 is not on this kernel's allowlist (--allow)"),
    (("*:22",), (), "CONNECT", "h.example", 22, ""),
    # --deny wins, on every port when it names none.
    (("*:22",), ("h.example",), "CONNECT", "h.example", 22,
     "h.example is on this kernel's denylist (--deny)"),
    ((), ("h.example:443",), "CONNECT", "h.example", 443,
     "h.example is on this kernel's denylist (--deny)"),
    ((), ("h.example:443",), "GET", "h.example", 80, ""),
])
def test_ports_are_http_s_unless_named(allow, deny, method, host, port, why):
    assert decide(Policy.parse(allow, deny), host, port, method=method) == why


@pytest.mark.pure
def test_the_lists_say_their_ports():
    assert Policy().describe() == "the public internet (443 for CONNECT, 80 for plain HTTP)"
    assert Policy.parse(["pypi"]).describe() == "pypi.org:443, files.pythonhosted.org:443"
    assert Policy.parse(["example.org", "*:8443"], ["b.example.org"]).describe() == \
        "example.org, *:8443 (without a port: 443 for CONNECT, 80 for plain HTTP) except " \
        "b.example.org"


def own_address():
    """The host's address toward the outside, None without a route out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))      # sends nothing: picks the source address
        except OSError:
            return None
        return probe.getsockname()[0]


@pytest.mark.pure
def test_the_host_s_own_addresses_are_found():
    assert proxy.is_local(ip("127.0.0.1")) and proxy.is_local(ip("127.0.0.2"))
    assert not proxy.is_local(ip("198.51.100.254"))
    if own_address():
        assert proxy.is_local(ip(own_address()))


@pytest.mark.pure
@pytest.mark.parametrize("entry, why", [
    ("pypi.org:0", "bad port '0'"), ("pypi.org:http", "bad port 'http'"),
    ("a b", "not a host name, *.domain or address"), ("*github.com", "not a host name"),
    ("foo.*", "not a host name"), ("[::1", "unbalanced [ ]"), ("host:", "empty port"),
    ("pypi.org:\uff14\uff14\uff13", "bad port"), ("pypi.org:+443", "bad port"),
])
def test_bad_entries(entry, why):
    with pytest.raises(ValueError) as info:
        Policy.parse([entry])
    assert str(info.value).startswith(f"--allow {entry!r}: {why}")


@pytest.mark.pure
def test_requests_parsed():
    assert parse_head(b"CONNECT PyPI.org.:443 HTTP/1.1\r\nHost: pypi.org:443") == \
        ("CONNECT", "pypi.org", 443, None)
    assert parse_head(b"CONNECT [::ffff:127.0.0.1]:22 HTTP/1.1")[1:3] == \
        ("::ffff:127.0.0.1", 22)
    # A port is its number, however written: 0443 is checked and connected to as 443.
    assert parse_head(b"CONNECT pypi.org:0443 HTTP/1.1")[2] == 443
    assert parse_head(b"CONNECT pypi.org:00022 HTTP/1.1")[2] == 22
    assert parse_head(b"GET http://u:p@h.example:22/x HTTP/1.1")[1:3] == ("h.example", 22)
    assert parse_head(b"GET http://[2001:db8::1]:22/ HTTP/1.1")[1:3] == ("2001:db8::1", 22)
    # The Host header is the URI's (the host checked), whatever the client wrote.
    assert parse_head(b"GET http://h.example/ HTTP/1.1\r\nHost: other.example:22\r\n"
                      b"hOST: third.example")[3] == \
        b"GET / HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n"
    assert parse_head(b"GET http://[2001:db8::1]:8080/ HTTP/1.1")[3].split(b"\r\n")[1] == \
        b"Host: [2001:db8::1]:8080"
    method, host, port, upstream = parse_head(
        b"GET http://mirror.example/simple/x/ HTTP/1.1\r\nHost: mirror.example\r\n"
        b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nAccept: */*")
    assert (method, host, port) == ("GET", "mirror.example", 80)
    assert upstream == (b"GET /simple/x/ HTTP/1.1\r\nHost: mirror.example\r\nAccept: */*\r\n"
                        b"Connection: close\r\n\r\n")
    for head, why in ((b"GET / HTTP/1.1", "this is a proxy"),
                      (b"CONNECT pypi.org HTTP/1.1", "no port"),
                      (b"GET https://pypi.org/ HTTP/1.1", "this is a proxy"),
                      (b"CONNECT a%eth0:1 HTTP/1.1", "is not a host name"),
                      (b"hello", "not an HTTP request")):
        with pytest.raises(BadRequest, match=why):
            parse_head(head)


# -- options: one line, before anything starts ----------------------------------------

@pytest.mark.privileged
def test_bad_options_are_one_line(workdir):
    for argv, line in (
            (["--network", "proxy", "--allow", "a b"],
             "ns-kernel: Sandbox.proxy_allow 'a b': not a host name, *.domain or address "
             "(HOST[:PORT], *.DOMAIN, an address, or a preset: conda, github, huggingface, "
             "pypi)"),
            (["--allow", "pypi"], "ns-kernel: --allow/--deny without --network proxy (they "
                                  "say where the proxy may go; this kernel's network is loopback)")):
        done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *argv, "--",
                               "/bin/true"], cwd=workdir, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
        assert done.stderr.startswith(line), done.stderr


@pytest.mark.privileged
def test_install_writes_the_mode(tmp_path):
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "install", "--prefix",
                           str(tmp_path), "--network", "proxy", "--allow", "pypi"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import json
    spec = json.loads((tmp_path / "share/jupyter/kernels/isolated-python/kernel.json").read_text())
    argv = spec["argv"]
    assert argv[argv.index("--network") + 1] == "proxy" and \
        argv[argv.index("--allow") + 1] == "pypi", argv


# -- real kernels -----------------------------------------------------------------------

class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder, context=None):
    server = http.server.ThreadingHTTPServer((SERVER, 0),
                                             functools.partial(Quiet, directory=folder))
    if context:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    """An index (a folder of wheels) and a file over HTTP, the same over HTTPS with a
    self-signed certificate the kernels are told about, and one more server that no
    kernelspec names; and the kernelspecs naming the first two."""
    folder = tempfile.mkdtemp(prefix="nsk-proxy-")
    os.chmod(folder, 0o755)
    make_wheel(folder, "nskproxyprobe", "1.0", "VERSION = '1.0'")
    with open(os.path.join(folder, "hello.txt"), "w") as f:
        f.write("hello through the proxy\n")
    os.chmod(os.path.join(folder, "hello.txt"), 0o644)
    cert = os.path.join(folder, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={SERVER}", "-addext", f"subjectAltName=IP:{SERVER}",
                    "-keyout", os.path.join(folder, "key.pem"), "-out", cert],
                   check=True, capture_output=True)
    os.chmod(cert, 0o644)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, os.path.join(folder, "key.pem"))
    plain, tls, other = serve(folder), serve(folder, context), serve(folder)
    # Connections wait in its backlog: it never answers, nor closes them.
    silent = socket.create_server((SERVER, 0))
    ports = {"http": plain.server_address[1], "https": tls.server_address[1],
             "other": other.server_address[1], "silent": silent.getsockname()[1]}
    listed = f"{SERVER}:{ports['http']},{SERVER}:{ports['https']},{SERVER}:{ports['silent']}"
    # A private home: what %pip installs goes with each kernel.
    specs = start_paths("proxy", ["--network", "proxy", "--allow", listed, "--allow", "pypi",
                                  "--deny", "files.example.com", "--home", "private"])
    yield {"folder": folder, "cert": cert, "ports": ports, "specs": specs,
           "any": write_spec("proxy-any", ["--network", "proxy", "--allow", "*"])}
    for server in (plain, tls, other):
        server.shutdown()
        server.server_close()
    silent.close()
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def logged(kernel, log):
    """The launcher's proxy lines for this kernel."""
    from ns_kernel.launcher import kernel_id_from
    # By its id, else (a temporary connection file) by that file's name, then its folder.
    named = kernel.km.connection_file
    who = f"ns-kernel: kernel {kernel_id_from(named)[:8] or os.path.basename(named)[:-5]} "
    return [line.split(" proxy: ", 1)[1] for line in log.read_text().splitlines()
            if line.startswith(who) and " proxy: " in line]


FETCH = r'''
import urllib.request, urllib.error, ssl
def fetch(url, cafile=None):
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=20, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.reason
    except urllib.error.URLError as e:
        return 0, str(e.reason)
'''


@pytest.mark.parametrize("path", ALL_PATHS)
def test_kernel_reaches_what_is_listed(servers, workdir, tmp_path, path):
    ports = servers["ports"]
    cert = os.path.join(workdir, "ca.pem")
    with open(servers["cert"]) as src, open(cert, "w") as dst:
        dst.write(src.read())
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=servers["specs"][path], stderr=stderr)
        try:
            k.execute(FETCH)
            env = k.value("{k: v for k, v in __import__('os').environ.items() "
                          "if 'proxy' in k.lower()}")
            assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:3128"
            assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
            assert k.value(f"fetch('http://{SERVER}:{ports['http']}/hello.txt')") == \
                (200, "hello through the proxy\n")
            assert k.value(f"fetch('https://{SERVER}:{ports['https']}/hello.txt', "
                           f"{cert!r})") == (200, "hello through the proxy\n")
            # The same host on a port not listed: refused, and the cell says why.
            status, reason = k.value(f"fetch('http://{SERVER}:{ports['other']}/hello.txt')")
            assert (status, reason) == (403, f"ns-kernel: {SERVER}:{ports['other']} is not "
                                        f"on this kernel's allowlist (--allow): {PORTS}")
            out, error, _ = k.execute(f"%pip install --no-cache-dir --no-index --find-links "
                                      f"http://{SERVER}:{ports['http']}/ nskproxyprobe",
                                      timeout=180)
            assert error is None and "Successfully installed nskproxyprobe-1.0" in out, out
            assert k.value("__import__('nskproxyprobe').VERSION") == "1.0"
            # Around the proxy there is no way out.
            assert k.value("(lambda s: s.connect_ex(('198.51.100.1', 80)))"
                           "(__import__('socket').socket())") == 101   # ENETUNREACH
            # HTTPS to a host not listed: the tunnel's refusal reaches the cell.
            status, reason = k.value("fetch('https://files.example.com/x')")
            assert "Tunnel connection failed: 403 ns-kernel: files.example.com is on this " \
                   "kernel's denylist (--deny)" in reason, reason
            # A tunnel still open when the kernel ends, to a server that would never close
            # it, gets its line too.
            k.execute(f"held = __import__('socket').create_connection(('127.0.0.1', 3128))\n"
                      f"held.sendall(b'CONNECT {SERVER}:{ports['silent']} HTTP/1.1\\r\\n\\r\\n')\n"
                      "assert held.recv(100).startswith(b'HTTP/1.1 200 ')\n"
                      "held.sendall(b'unanswered')")
        finally:
            stop_kernel(k)
    lines = logged(k, log)
    assert f"allowed CONNECT {SERVER}:{ports['silent']} ({SERVER}): 10 bytes sent, 0 received" \
        in lines, log.read_text()
    assert f"allowed GET {SERVER}:{ports['http']} ({SERVER}): " in "\n".join(lines), lines
    assert any(re.fullmatch(rf"allowed CONNECT {SERVER}:{ports['https']} \({SERVER}\): "
                            r"\d+ bytes sent, \d+ received", line) for line in lines), lines
    assert f"refused GET {SERVER}:{ports['other']}: {SERVER}:{ports['other']} is not on " \
           f"this kernel's allowlist (--allow): {PORTS}" in lines
    assert "refused CONNECT files.example.com:443: files.example.com is on this kernel's " \
           "denylist (--deny)" in lines


ASK = r'''
import http.client
def ask(method, target):
    c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=20)
    c.request(method, target if method == "CONNECT" else f"http://{target}/hello.txt")
    r = c.getresponse()
    return r.status, r.reason
'''


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_always_denied_even_with_allow_all(servers, workdir, tmp_path, path):
    # The provisioner's kernelspec says it in its config stanza.
    spec = servers["any"] if path == "argv" else write_spec(
        "proxy-any-provisioner", provisioner=True,
        config={"network": "proxy", "proxy_allow": ["*"]})
    # At the ports `*` opens: GET to 80, CONNECT to 443 (and test_own_and_metadata_addresses_in_nat64_and_6to4_form with the
    # test servers' own ports named).
    hosts = ["localhost", SERVER, "127.1", "0x7f000002", "2130706434", "[::1]",
             f"[::ffff:{SERVER}]", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254",
             "100.64.0.1", "0.0.0.0", *([own_address()] if own_address() else [])]
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(ASK)
            for host in hosts:
                for method, target in (("GET", host), ("CONNECT", f"{host}:443")):
                    status, reason = k.value(f"ask({method!r}, {target!r})")
                    assert status == 403 and reason.endswith(
                        "refused unless --allow names that exact address"), (target, reason)
        finally:
            stop_kernel(k)
    lines = logged(k, log)
    assert len([line for line in lines if line.startswith("refused ")]) == 2 * len(hosts)
    assert "refused GET localhost:80: localhost (127.0.0.1) is a loopback address, " \
           "refused unless --allow names that exact address" in lines


def test_bad_requests_are_one_log_line(servers, workdir, tmp_path):
    """A target with a line break in it: one line in the log, one status line."""
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=servers["any"], stderr=stderr)
        try:
            k.execute("import socket\n"
                      "s = socket.create_connection(('127.0.0.1', 3128))\n"
                      "s.sendall(b'GET http://a\\nns-kernel:forged/ HTTP/1.1\\r\\n\\r\\n')\n"
                      "answer = s.recv(4096)")
            assert k.value("answer.split(b'\\r\\n')[0]") == \
                b"HTTP/1.1 400 ns-kernel: http://a?ns-kernel:forged/: bad port 'forged'"
        finally:
            stop_kernel(k)
    forged = [line for line in log.read_text().splitlines() if "forged" in line]
    assert forged == [line for line in forged if line.startswith("ns-kernel: kernel ")]
    assert len(forged) == 1, forged


def test_run_command_goes_through_its_proxy(servers, workdir):
    port = servers["ports"]["http"]
    done = subprocess.run(
        [sys.executable, "-P", "-m", "ns_kernel", "run", "--network", "proxy", "--allow",
         f"{SERVER}:{port}", "--", sys.executable, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://{SERVER}:{port}/"
         "hello.txt').read().decode(), end='')"],
        cwd=workdir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello through the proxy\n"
    assert f"ns-kernel: command proxy: allowed GET {SERVER}:{port} ({SERVER}): " in done.stderr


def test_each_kernel_has_its_own_proxy(servers, workdir, tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        a = start_kernel(workdir, kernel_name=servers["any"], stderr=stderr)
        b = start_kernel(workdir, kernel_name=servers["any"], stderr=stderr)
        try:
            for k, target in ((a, "10.0.0.1:80"), (b, "10.0.0.2:80")):
                k.execute(ASK)
                assert k.value(f"ask('CONNECT', {target!r})")[0] == 403
        finally:
            stop_kernel(a)
            stop_kernel(b)
    assert [line.split(":")[0] for line in logged(a, log) if "refused" in line] == \
        ["refused CONNECT 10.0.0.1"]
    assert [line.split(":")[0] for line in logged(b, log) if "refused" in line] == \
        ["refused CONNECT 10.0.0.2"]


def test_pip_install_from_pypi(servers, workdir, tmp_path):
    """The real index, through the proxy, with --allow pypi (needs PyPI reachable)."""
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=servers["specs"]["argv"], stderr=stderr)
        try:
            out, error, _ = k.execute("%pip install --no-cache-dir --no-deps --index-url "
                                      "https://pypi.org/simple pyjokes", timeout=300)
            assert error is None and "Successfully installed pyjokes" in out, out
            assert k.value("bool(__import__('pyjokes').get_joke())") is True
        finally:
            stop_kernel(k)
    lines = "\n".join(logged(k, log))
    assert "allowed CONNECT pypi.org:443" in lines and \
        "allowed CONNECT files.pythonhosted.org:443" in lines, lines


def test_doctor_says_what_the_mode_gives():
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "doctor", "--network",
                           "proxy", "--allow", "pypi"], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  ok    network proxy: only lo; HTTP(S) out through the kernel's own proxy " \
           "(127.0.0.1:3128 inside, run by its launcher) to pypi.org:443, " \
           "files.pythonhosted.org:443; the host's own" in done.stdout
    assert "  ok    kernel (argv): " in done.stdout and "network lo, cgroup /" in done.stdout


BANNER = b"SSH-2.0-OpenSSH_9.2p1 ns-kernel-test\r\n"
# A server that speaks first, as sshd does: what a tunnel to it brings back.
SPEAKS_FIRST = f"""
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print(server.getsockname()[1], flush=True)
while True:
    client, _ = server.accept()
    with client:
        client.sendall({BANNER!r})
"""


@pytest.fixture
def public_server(tmp_path):
    """An HTTP server at an address that is neither the host's nor a private one (a
    documentation range, 198.51.100.254), on port 80, in a network namespace of its own
    joined to the host by a veth pair whose host end, 198.51.100.253, is then one of the
    host's own; beside it on port 22 a server that answers as sshd does (BANNER). Making
    them needs root."""
    name = f"nsk-proxy-{os.getpid()}"
    outside, inside = f"nskp{os.getpid() % 100000}", f"nskq{os.getpid() % 100000}"
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns",
              name],
             ["ip", "addr", "add", "198.51.100.253/30", "dev", outside],
             ["ip", "link", "set", outside, "up"],
             ["ip", "-n", name, "addr", "add", "198.51.100.254/30", "dev", inside],
             ["ip", "-n", name, "link", "set", inside, "up"],
             ["ip", "-n", name, "link", "set", "lo", "up"]]
    (tmp_path / "hello.txt").write_text("hello from a public address\n")
    os.chmod(tmp_path, 0o755)
    server = ssh = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-u", "-m",
                                   "http.server", "--bind", "198.51.100.254", "--directory",
                                   str(tmp_path), "80"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        ssh = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", SPEAKS_FIRST,
                                "198.51.100.254", "22"], stdout=subprocess.PIPE, text=True)
        assert ssh.stdout.readline().strip() == "22"
        yield int(server.stdout.readline().split(" port ")[1].split()[0])
    finally:
        for process in (server, ssh):
            if process:
                process.kill()
                process.wait()
                process.stdout.close()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.skipif(os.getuid() != 0, reason="makes a network namespace and a veth pair on "
                    "the host (root); the ordinary user's runs reach PyPI instead")
def test_public_address_without_the_internet(public_server, workdir, tmp_path):
    port = public_server
    log = tmp_path / "server.log"
    spec = write_spec("proxy-public", ["--network", "proxy"])    # no list: the internet
    assert port == 80
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(FETCH)
            assert k.value(f"fetch('http://198.51.100.254:{port}/hello.txt')") == \
                (200, "hello from a public address\n")
            # The host's end of the pair is the host's: refused like its loopback.
            assert k.value(f"fetch('http://198.51.100.253:{port}/hello.txt')") == \
                (403, "ns-kernel: 198.51.100.253 is one of the host's own addresses, "
                      "refused unless --allow names that exact address")
        finally:
            stop_kernel(k)
    assert any(line.startswith(f"allowed GET 198.51.100.254:{port} (198.51.100.254): ")
               for line in logged(k, log))


# A tunnel: CONNECT (or a plain-HTTP request, whose rest the proxy relays as
# bytes) to a port that is not HTTP(S)'s; what came back, up to a banner.
TUNNEL = r'''
import socket
def tunnel(head):
    with socket.create_connection(("127.0.0.1", 3128), timeout=20) as s:
        s.sendall(head.encode() + b"\r\n\r\n")
        got = b""
        while b"SSH-" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.decode("latin-1")
'''


@pytest.fixture(scope="module")
def speaks_first():
    """A server on SERVER that greets each connection as sshd does, and kernelspecs for
    every start path whose --allow names its address but no port."""
    server = subprocess.Popen([sys.executable, "-c", SPEAKS_FIRST, SERVER, "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield port, start_paths("proxy-ports", ["--network", "proxy", "--allow", SERVER])
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_no_tunnel_to_a_port_not_named(speaks_first, workdir, tmp_path, path):
    """Attack (issue 22, item 5): the proxy relayed CONNECT to any port, and a plain-HTTP
    request's bytes after its head as well: a raw TCP tunnel (ssh's banner came back).
    An entry without a port (here the exact address of a server on host loopback, the one
    way a kernel reaches one) now opens 443 for CONNECT and 80 for plain HTTP only."""
    port, specs = speaks_first
    said = f"{SERVER}:{port} is not on this kernel's allowlist (--allow): {PORTS}"
    heads = {f"CONNECT {SERVER}:{port} HTTP/1.1": said,
             f"CONNECT {SERVER}:0{port} HTTP/1.1": said,        # the same port
             f"GET http://{SERVER}:{port}/ HTTP/1.1\r\nHost: {SERVER}": said,
             f"GET http://x@{SERVER}:{port}/ HTTP/1.1": said,
             # The address in IPv6 form is not the entry's literal: not listed at all.
             f"CONNECT [::ffff:{SERVER}]:{port} HTTP/1.1":
                 f"::ffff:{SERVER} is not on this kernel's allowlist (--allow)"}
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        k = start_kernel(workdir, kernel_name=specs[path], stderr=stderr)
        try:
            k.execute(TUNNEL)
            got = {head: k.value(f"tunnel({head!r})") for head in heads}
        finally:
            stop_kernel(k)
    for head, why in heads.items():
        assert got[head].split("\r\n")[0] == f"HTTP/1.1 403 ns-kernel: {why}", (head, got)
        assert "SSH-" not in got[head]
    lines = logged(k, log)
    assert f"refused CONNECT {SERVER}:{port}: {said}" in lines, lines
    assert f"refused GET {SERVER}:{port}: {said}" in lines, lines
    assert not [line for line in lines if line.startswith("allowed ")], lines


@pytest.mark.skipif(os.getuid() != 0, reason="makes a network namespace and a veth pair on "
                    "the host (root); the ordinary user's runs test the same on loopback")
@pytest.mark.parametrize("path", ALL_PATHS)
def test_no_tunnel_to_ssh_without_any_allow(public_server, workdir, tmp_path, path):
    """Attack: `--network proxy` with no --allow, CONNECT to a public address's port 22,
    for sshd's banner: refused, in the words of the others; plain HTTP to that address
    still goes."""
    said = "198.51.100.254:22 is not a port this kernel's proxy opens: " + PORTS
    spec = start_paths("proxy-no-list", ["--network", "proxy"])[path]
    with open(tmp_path / "server.log", "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(TUNNEL + FETCH)
            got = {head: k.value(f"tunnel({head!r})") for head in (
                "CONNECT 198.51.100.254:22 HTTP/1.1", "CONNECT 198.51.100.254:022 HTTP/1.1",
                "GET http://198.51.100.254:22/ HTTP/1.1")}
            fetched = k.value("fetch('http://198.51.100.254/hello.txt')")
        finally:
            stop_kernel(k)
    for head, answer in got.items():
        assert answer.split("\r\n")[0] == f"HTTP/1.1 403 ns-kernel: {said}", (head, got)
    assert fetched == (200, "hello from a public address\n")


# -- the proxy's address forms and its log -------------------------------------------------
# An address refused in one spelling is refused in every other (IPv4-mapped, NAT64, 6to4);
# a kernel cannot flood the server log through its proxy.

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
    spec = write_spec("proxy-deny", ["--network", "proxy", "--deny", PUBLIC])
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
    spec = write_spec("proxy-flood", ["--network", "proxy", "--allow", "pypi"])
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
    spec = write_spec("proxy-method", ["--network", "proxy", "--allow", "pypi"])
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
    spec = write_spec("proxy-nat64", ["--network", "proxy", "--allow", "*"])
    with open(tmp_path / "server.log", "w") as stderr:
        k = start_kernel(workdir, kernel_name=spec, stderr=stderr)
        try:
            k.execute(ASK)
            answers = {str(a): k.value(f"ask('CONNECT', '[{a}]:443')", timeout=90)
                       for a in (nat64, sixtofour, metadata)}
        finally:
            stop_kernel(k)
    assert all(status == 403 for status, _ in answers.values()), answers
