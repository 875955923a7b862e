"""Installing the kernelspec the two documented ways, and starting what was installed."""
import json
import os
import subprocess
import sys

from conftest import start_kernel, stop_kernel

REPO = os.path.join(os.path.dirname(__file__), "..")
BIN = os.path.dirname(sys.executable)


def kernelspecs(prefix):
    env = dict(os.environ, JUPYTER_PATH=os.path.join(prefix, "share", "jupyter"))
    out = subprocess.run([os.path.join(BIN, "jupyter"), "kernelspec", "list", "--json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["kernelspecs"]


def test_ns_kernel_install_with_options(tmp_path):
    prefix = str(tmp_path)
    proc = subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={prefix}",
                           "--name=isolated-small", "--display-name=Isolated Python (small)",
                           "--tmp-size=64M", "--network=none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Installed kernelspec isolated-small" in proc.stdout
    spec = kernelspecs(prefix)["isolated-small"]["spec"]
    assert spec["display_name"] == "Isolated Python (small)"
    assert spec["interrupt_mode"] == "signal"
    argv = spec["argv"]
    assert argv[:4] == [sys.executable, "-P", "-m", "ns_kernel"]
    assert argv[-2:] == ["-f", "{connection_file}"]
    assert "--tmp-size=64M" in argv and "--network=none" in argv
    assert not any(a.startswith(("--name", "--display-name", "--prefix")) for a in argv)


def test_install_rejects_bad_options(tmp_path):
    proc = subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={tmp_path}",
                           "--network=internet"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.startswith("ns-kernel: ") and "internet" in proc.stderr
    assert not os.path.exists(tmp_path / "share" / "jupyter" / "kernels")


def test_jupyter_kernelspec_install_of_the_shipped_spec(tmp_path, workdir):
    prefix = str(tmp_path)
    subprocess.run([os.path.join(BIN, "jupyter"), "kernelspec", "install",
                    os.path.join(REPO, "kernelspec", "isolated-python"), f"--prefix={prefix}"],
                   check=True, capture_output=True)
    specs = kernelspecs(prefix)
    assert specs["isolated-python"]["spec"]["display_name"] == "Isolated Python"
    # Its argv says `python3`: jupyter_client runs it with its own interpreter.
    old = os.environ["JUPYTER_PATH"]
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    try:
        k = start_kernel(workdir)
        try:
            assert k.value("__import__('os').getpid()") == 2
        finally:
            stop_kernel(k)
    finally:
        os.environ["JUPYTER_PATH"] = old
