"""Every bad input and hostile host: one line naming the cause and the fix, a non-zero exit,
and nothing left behind."""
import json
import os
import stat
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from jupyter_client.connect import write_connection_file

from conftest import LOOPBACK, stray_prestarted, wait_until


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix="nsk-bad-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(f"{path}-state", ignore_errors=True)


def launch(base, *args, connection=None, env=None, cwd=None, preexec_fn=None, timeout=60):
    """Run the launcher as kernel.json does; return (exit code, stderr lines)."""
    argv = [sys.executable, "-P", "-m", "ns_kernel", f"--socket-dir={base}/sockets",
            # Beside the folder, not in it: a state dir the kernel may write is refused.
            f"--Sandbox.state_dir={base}-state", *args]
    if connection is not None:
        argv += ["-f", connection]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or base, env=env, preexec_fn=preexec_fn)
    return proc.returncode, proc.stderr.strip().splitlines()


def assert_one_line(lines, *fragments):
    errors = [line for line in lines if line.startswith("ns-kernel:")]
    assert len(errors) == 1, lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_nothing_left(base):
    sockets = os.path.join(base, "sockets")
    assert not os.path.exists(sockets) or os.listdir(sockets) == []
    assert wait_until(lambda: not stray_prestarted(), timeout=3), stray_prestarted()


def conn_file(base, **changes):
    path = os.path.join(base, "kernel-00000000-0000-0000-0000-000000000000.json")
    mode = os.stat(base).st_mode
    write_connection_file(path)
    # jupyter_client makes the folder it writes into sticky (against /tmp cleaners); with a
    # 0777 test folder that would read as a folder shared by every user, like /tmp.
    os.chmod(base, stat.S_IMODE(mode))
    with open(path) as f:
        info = json.load(f)
    info.update(changes)
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def test_missing_connection_file(base):
    code, lines = launch(base, connection=f"{base}/nope.json")
    assert code != 0
    assert_one_line(lines, "read connection file", "nope.json", "No such file or directory",
                    "restart the kernel")
    assert_nothing_left(base)


def test_no_arguments_is_a_usage_error():
    for argv in ([os.path.join(os.path.dirname(sys.executable), "ns-kernel")],
                 [sys.executable, "-P", "-m", "ns_kernel"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert lines[0] == "usage:" and len(lines) < 10, lines
        assert any(line.startswith("  ns-kernel run ") for line in lines), lines
        assert lines[-1] == "`ns-kernel --help` lists the options."


def test_install_where_it_may_not_write(tmp_path):
    """One line naming the kernels dir, and for the system's the flags that fix it."""
    ns_kernel = os.path.join(os.path.dirname(sys.executable), "ns-kernel")
    proc = subprocess.run([ns_kernel, "install", "--prefix", "/proc/ns-kernel-nowhere"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "ns-kernel: install kernelspec isolated-python into /proc/ns-kernel-nowhere kernels "
        "dir: "), proc.stderr
    if os.getuid() != 0:      # root may write the system's dir: nothing to refuse there
        proc = subprocess.run([ns_kernel, "install"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "JUPYTER_PATH": str(tmp_path)})
        assert proc.returncode != 0
        assert proc.stderr.strip().endswith("(only root may write there: add --user, "
                                            "--sys-prefix or --prefix P)"), proc.stderr


def test_no_connection_file_argument(base):
    code, lines = launch(base)
    assert code != 0
    assert_one_line(lines, "no connection file", "-f CONNECTION_FILE")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
])
def test_malformed_connection_file(base, content, fragment):
    path = os.path.join(base, "kernel-bad.json")
    with open(path, "w") as f:
        f.write(content)
    code, lines = launch(base, connection=path)
    assert code != 0
    assert_one_line(lines, fragment, path)
    assert_nothing_left(base)


@pytest.mark.parametrize("changes, fragment", [
    ({"transport": "udp"}, "unknown transport 'udp'"),
    ({"shell_port": "x"}, "shell_port is 'x', not a port number"),
    ({"hb_port": 70000}, "hb_port is 70000"),
    ({"signature_scheme": "rot13"}, "unknown signature_scheme 'rot13'"),
    ({"curve_publickey": "x" * 40}, "curve_publickey without curve_secretkey"),
    ({"curve_publickey": "x" * 40, "curve_secretkey": "~" * 40},
     "curve_secretkey is not a CurveZMQ key (40 characters of Z85)"),
])
def test_invalid_connection_fields(base, changes, fragment):
    code, lines = launch(base, connection=conn_file(base, **changes))
    assert code != 0
    assert_one_line(lines, fragment)
    assert_nothing_left(base)


def test_port_already_taken(base):
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        code, lines = launch(base, connection=conn_file(base, iopub_port=port))
    finally:
        holder.close()
    assert code != 0
    assert_one_line(lines, f"bind tcp {LOOPBACK}:{port} (iopub)", "Address already in use",
                    "restart the kernel")
    assert_nothing_left(base)


def test_unwritable_socket_dir(base):
    argv = [sys.executable, "-P", "-m", "ns_kernel", "--socket-dir=/etc/hostname/ns-kernel",
            "-f", conn_file(base)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=base)
    assert proc.returncode != 0
    assert_one_line(proc.stderr.splitlines(), "mkdir /etc/hostname", "Not a directory",
                    "--socket-dir")


def test_option_given_twice(base):
    code, lines = launch(base, "--socket-dir=/tmp/a", connection=conn_file(base))
    assert code != 0
    assert_one_line(lines, "bad option", "socket_dir only accepts one value", "--help-all")


def test_working_directory_root_is_refused(base):
    code, lines = launch(base, connection=conn_file(base), cwd="/")
    assert code != 0
    assert_one_line(lines, "working directory /", "start Jupyter from the notebook's folder")
    assert_nothing_left(base)


def test_failed_setup_step_inside_the_sandbox(base):
    # sethostname(2) refuses names over 64 bytes: the failure happens in init, after fork.
    code, lines = launch(base, "--Sandbox.hostname_prefix=" + "h" * 80, connection=conn_file(base))
    assert code != 0
    assert_one_line(lines, "sethostname", "Invalid argument")
    assert_nothing_left(base)


def test_missing_bind_source(base):
    code, lines = launch(base, "--ro-bind=/nonexistent/data", connection=conn_file(base))
    assert code != 0
    assert_one_line(lines, "bind /nonexistent/data", "No such file or directory")
    assert_nothing_left(base)


@pytest.mark.parametrize("options", [[], ["--cold"]], ids=["warm", "cold"])
def test_server_gone_before_the_start(base, options):
    # The Jupyter server died while asking for the kernel: nobody will talk to it, so
    # nothing starts, and nothing is left.
    server = subprocess.Popen(["true"])
    server.wait()
    code, lines = launch(base, *options, connection=conn_file(base),
                         env=dict(os.environ, JPY_PARENT_PID=str(server.pid)))
    assert code != 0
    assert_one_line(lines, f"ns-kernel: the Jupyter server (JPY_PARENT_PID {server.pid}) "
                           "has exited (nothing to start a kernel for)")
    assert_nothing_left(base)


def test_invalid_option_value(base):
    code, lines = launch(base, "--memory=lots", connection=conn_file(base))
    assert code != 0
    assert_one_line(lines, "memory", "not a size: 'lots'")


def _no_user_namespaces():
    """preexec_fn: a user namespace whose max_user_namespaces is 0, as on a host with
    user namespaces disabled (the sysctl is per namespace and its root may lower it)."""
    from ns_kernel.syscalls import CloneFlags, unshare
    uid, gid = os.getuid(), os.getgid()
    unshare(CloneFlags.CLONE_NEWUSER)
    # Root becomes an ordinary uid in there: the launcher takes the unprivileged path.
    inside = uid or 1000
    for name, text in (("uid_map", f"{inside} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{inside} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        os.write(fd, text.encode())
        os.close(fd)
    fd = os.open("/proc/sys/user/max_user_namespaces", os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)


def test_host_without_user_namespaces(base):
    os.chmod(base, 0o777)   # the launcher runs as a mapped root that is not host root
    # Cold: in this test's own user namespace the warm client trusts no template (right),
    # and says so in a line of its own before starting cold.
    code, lines = launch(base, "--cold", connection=conn_file(base),
                         preexec_fn=_no_user_namespaces)
    assert code != 0
    assert_one_line(lines, "unshare(CLONE_NEWUSER)", "No space left on device",
                    "user namespaces are disabled: sysctl -w user.max_user_namespaces=")
    assert_nothing_left(base)


def test_a_broken_ipykernel_fails_the_start_at_once(base):
    # The warm template cannot import ipykernel and dies as it starts. The launcher hears
    # it at once (it used to wait 60 s for the template to listen: past Jupyter's own
    # start timeout), says why in one line, and the cold start fails as a plain kernel's
    # would, in its own words.
    os.chmod(base, 0o755)      # root's sandbox (nobody) reads the shadowing package
    shadow = os.path.join(base, "shadow")
    os.makedirs(os.path.join(shadow, "ipykernel"))
    with open(os.path.join(shadow, "ipykernel", "__init__.py"), "w") as f:
        f.write("raise ImportError('this ipykernel is broken')\n")
    code, lines = launch(base, connection=conn_file(base), timeout=30,
                         env=dict(os.environ, PYTHONPATH=shadow))
    assert code != 0
    warm = [line for line in lines if line.startswith("ns-kernel: warm start:")]
    assert len(warm) == 1 and "start the warm template" in warm[0], lines
    assert "this ipykernel is broken" in warm[0] and "starts cold" in warm[0], warm
    assert any("ImportError: this ipykernel is broken" in line for line in lines), lines
    assert_nothing_left(base)


@pytest.mark.skipif(os.getuid() != 0, reason="only root's sandbox runs as another uid")
def test_interpreter_unreachable_by_sandbox_uid(base):
    # A venv whose directory only root may enter: the sandbox's uid (nobody) cannot exec it.
    os.chmod(base, 0o755)
    venv = os.path.join(base, "private-venv")
    os.mkdir(venv, 0o700)
    os.mkdir(os.path.join(venv, "bin"), 0o700)
    os.symlink(os.path.realpath(sys.executable), os.path.join(venv, "bin", "python"))
    shutil.copy(os.path.join(sys.prefix, "pyvenv.cfg"), venv)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
        __import__("ns_kernel").__file__)))
    argv = [os.path.join(venv, "bin", "python"), "-P", "-m", "ns_kernel",
            f"--socket-dir={base}/sockets", "-f", conn_file(base)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=base, env=env)
    from conftest import stop_templates
    stop_templates(argv[0])     # this interpreter's warm template: its kernel exec'd instead
    assert proc.returncode != 0
    assert_one_line(proc.stderr.splitlines(), "execve", "Permission denied",
                    "runs as uid 65534", "/usr/bin/python3")
    assert_nothing_left(base)


@pytest.mark.skipif(os.getuid() != 0, reason="only root chooses the sandbox's uid")
def test_id_map_failure(base):
    # uid 4294967295 is (uid_t)-1, which no uid_map may name.
    code, lines = launch(base, "--uid=4294967295", connection=conn_file(base))
    assert code != 0
    assert_one_line(lines, "uid_map", "4294967295")
    assert_nothing_left(base)


def test_notebook_folder_on_the_launchers_path_is_refused(base):
    # An empty PYTHONPATH entry (`PYTHONPATH=$PYTHONPATH:/x` with it unset) is the current
    # folder: a kernel could plant modules there for the next launcher, outside.
    env = dict(os.environ, PYTHONPATH=":/nonexistent")
    code, lines = launch(base, connection=conn_file(base), env=env)
    assert code != 0
    assert_one_line(lines, f"sys.path entry {os.path.realpath(base)}", "PYTHONPATH")
    assert_nothing_left(base)
