"""Installing the kernelspec the two documented ways, and starting what was installed."""
import json
import os
import subprocess
import sys

import pytest

from conftest import STARTED, start_kernel, stop_kernel, stop_templates
from ns_kernel import kernelspec

REPO = os.path.join(os.path.dirname(__file__), "..")
BIN = os.path.dirname(sys.executable)


def kernelspecs(prefix):
    env = dict(os.environ, JUPYTER_PATH=os.path.join(prefix, "share", "jupyter"))
    out = subprocess.run([os.path.join(BIN, "jupyter"), "kernelspec", "list", "--json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["kernelspecs"]


@pytest.mark.privileged
def test_ns_kernel_install_with_options(tmp_path):
    prefix = str(tmp_path)
    proc = subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={prefix}",
                           "--name=isolated-small", "--display-name=Isolated Python (small)",
                           "--tmp-size=64M", "--network=none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Installed kernelspec isolated-small" in proc.stdout
    spec = kernelspecs(prefix)["isolated-small"]["spec"]
    assert spec["metadata"]["supported_encryption"] == ["curve"]
    assert spec["metadata"]["debugger"] is False    # debugpy needs the loopback
    assert spec["display_name"] == "Isolated Python (small)"
    assert spec["interrupt_mode"] == "signal"
    argv = spec["argv"]
    assert argv[:4] == [sys.executable, "-P", "-m", "ns_kernel"]
    assert argv[-2:] == ["-f", "{connection_file}"]
    assert "--tmp-size=64M" in argv and "--network=none" in argv
    assert not any(a.startswith(("--name", "--display-name", "--prefix")) for a in argv)


def test_shipped_spec_is_what_ns_kernel_install_writes(tmp_path):
    # Two ways to install (README): they must give the same kernel, with what ipykernel's
    # own spec declares (JupyterLab's debugger, CurveZMQ), its argv's python aside.
    from ipykernel.kernelspec import get_kernel_dict
    subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={tmp_path}"],
                   check=True, capture_output=True)
    with open(tmp_path / "share" / "jupyter" / "kernels" / "isolated-python" / "kernel.json") as f:
        installed = json.load(f)
    with open(os.path.join(REPO, "kernelspec", "isolated-python", "kernel.json")) as f:
        shipped = json.load(f)
    assert shipped["argv"][0] == "python3" and installed["argv"][0] == sys.executable
    assert shipped["argv"][1:] == installed["argv"][1:]
    assert {**shipped, "argv": None} == {**installed, "argv": None}
    plain = get_kernel_dict()
    assert {k: v for k, v in installed["metadata"].items() if k != "kernel_provisioner"} \
        == plain["metadata"]
    assert installed["metadata"]["debugger"] is True
    assert installed["metadata"]["supported_encryption"] == ["curve"]
    # And its logo, which JupyterLab's launcher shows instead of a letter.
    for logo in ("logo-svg.svg", "logo-32x32.png", "logo-64x64.png"):
        with open(tmp_path / "share" / "jupyter" / "kernels" / "isolated-python" / logo, "rb") as f, \
                open(os.path.join(REPO, "kernelspec", "isolated-python", logo), "rb") as g:
            assert f.read() == g.read(), logo


@pytest.mark.privileged
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
    resources = specs["isolated-python"]["resource_dir"]
    assert {"logo-svg.svg", "logo-64x64.png"} <= set(os.listdir(resources))
    # Its argv says `python3`: jupyter_client runs it with its own interpreter.
    old = os.environ["JUPYTER_PATH"]
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    try:
        k = start_kernel(workdir)
        try:
            assert k.value("__import__('os').getpid()") == 2
            # Warm by default, as every spec `ns-kernel install` writes.
            assert k.value(STARTED) == "warm"
        finally:
            stop_kernel(k)
            stop_templates()
    finally:
        os.environ["JUPYTER_PATH"] = old


# Each way `ns-kernel install` can write a spec, and what shows inside that it took.
VARIANTS = {
    "warm": ([], STARTED, "warm"),
    # What kernelspecs of older versions say: the default.
    "--warm": (["--warm"], STARTED, "warm"),
    "cold": (["--cold"], STARTED, "prestarted"),
    "no-prestart": (["--no-prestart"], STARTED, "exec"),
    "limits": (["--memory", "512M", "--pids", "64"], None, None),
    "home": (["--home=private"], "[m.split()[2] for m in open('/proc/self/mounts') "
             "if m.split()[1] == __import__('os').path.expanduser('~')]", ["tmpfs"]),
    "network": (["--network=none"], "open('/sys/class/net/lo/operstate').read().strip()", "down"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_install_variant_starts_through_the_provisioner(tmp_path, workdir, monkeypatch,
                                                              user_base, variant):
    # What JupyterLab does with an installed spec: start it through the provisioner the
    # spec names, whose own reading of the spec's options must take every one of them.
    from ns_kernel import warm
    from ns_kernel.provisioner import IsolatedProvisioner
    from test_limits import assert_memory_limit_in_force
    options, probe, expected = VARIANTS[variant]
    name = f"variant-{variant}"
    subprocess.run([os.path.join(BIN, "ns-kernel"), "install", f"--prefix={tmp_path}",
                    f"--name={name}", *options], check=True, capture_output=True)
    monkeypatch.setenv("JUPYTER_PATH", os.path.join(tmp_path, "share", "jupyter"))
    k = start_kernel(workdir, kernel_name=name)
    try:
        assert isinstance(k.km.provisioner, IsolatedProvisioner)
        metadata = k.km.kernel_spec.metadata
        assert metadata["supported_encryption"] == ["curve"]
        # debugpy listens on the kernel's loopback, which --network none has down.
        assert metadata["debugger"] is (variant != "network")
        assert k.km.get_connection_info()["transport"] == "ipc"
        assert k.value("__import__('os').getpid()") == 2
        if probe:
            assert k.value(probe) == expected
        else:
            assert_memory_limit_in_force(k)
    finally:
        stop_kernel(k)
        warm.stop()


# -- the no-network hint's command, as a person runs it ---------------------------------

NO_INDEX = "%pip install --index-url https://pypi.invalid/simple nosuchpackage-ns-kernel"


def scoped(scope, tmp_path, monkeypatch):
    """Where Jupyter finds a spec installed with `scope`, set up in tmp_path, and the
    install options that say it."""
    if scope == "--user":
        monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
        return ["--user"]
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return [f"--prefix={tmp_path}"]


@pytest.mark.parametrize("scope", ["--user", "--prefix"])
def test_the_no_network_hint_s_command_works_as_printed(tmp_path, workdir, monkeypatch, scope):
    # A kernelspec of options of its own (a name, a display name, a memory limit, the
    # loopback said outright); in its notebook a %pip that needs an index; the command the
    # hint names, run as printed, as in JupyterLab's terminal: the same spec, in the same
    # place, with those options, and a network.
    import shlex
    name = f"hint{scope.replace('-', '_')}"
    options = scoped(scope, tmp_path, monkeypatch)
    subprocess.run([os.path.join(BIN, "ns-kernel"), "install", *options, f"--name={name}",
                    "--display-name=Course (small)", "--memory=512M", "--network=loopback"],
                   check=True, capture_output=True)
    k = start_kernel(workdir, kernel_name=name)
    try:
        out = k.execute(NO_INDEX, timeout=120)[0]
    finally:
        stop_kernel(k)
    command = out.split("in a terminal: `", 1)[1].split("`", 1)[0]
    assert command.startswith(f"{BIN}/ns-kernel install {scope} "), command
    before = {path for path in tmp_path.rglob("kernel.json")}
    proc = subprocess.run(shlex.split(command), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {path for path in tmp_path.rglob("kernel.json")} == before    # rewritten there
    spec = json.loads(before.pop().read_text())
    assert spec["display_name"] == "Course (small)"
    options = spec["argv"][4:-2]
    assert "--memory=512M" in options and "--network=loopback" not in options, options
    assert options[-4:] == ["--network", "proxy", "--allow", "pypi"], options
    k = start_kernel(workdir, kernel_name=name)
    try:
        assert k.value("'HTTP_PROXY' in __import__('os').environ")     # its proxy
        assert k.value("__import__('socket').gethostname()").startswith("isolated-")
    finally:
        stop_kernel(k)


@pytest.mark.pure
def test_the_hint_s_command_says_the_scope_the_spec_is_in(tmp_path, monkeypatch):
    # --sys-prefix (scripts/lab's) where the spec is in this environment's Jupyter dir;
    # nothing (the generic words) where install cannot write (a JUPYTER_PATH dir).
    import jupyter_core.paths
    from ns_kernel.offline import NETWORK
    prefix = tmp_path / "env"
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(jupyter_core.paths, "ENV_JUPYTER_PATH", [str(prefix / "share" / "jupyter")])
    for where, options in ((prefix, ["--cold"]), (tmp_path / "elsewhere", [])):
        kernelspec.write_kernel_spec(str(where / "share" / "jupyter" / "kernels" / "lab"),
                                     kernelspec.kernel_dict(["--network", "none", *options]))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "elsewhere" / "share" / "jupyter"))
    command = kernelspec.install_command("lab", NETWORK)
    assert command.endswith(" install --prefix " + str(tmp_path / "elsewhere")
                            + " --name lab --network proxy --allow pypi"), command
    monkeypatch.delenv("JUPYTER_PATH")
    assert kernelspec.install_command("lab", NETWORK).endswith(
        " install --sys-prefix --name lab --cold --network proxy --allow pypi")
    kernelspec.write_kernel_spec(str(tmp_path / "bare" / "kernels" / "lab"), kernelspec.kernel_dict())
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "bare"))
    assert kernelspec.install_command("lab", NETWORK) is None
