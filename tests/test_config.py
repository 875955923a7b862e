"""Settings come from the Jupyter config path, then the command line: later ones win."""
import json
import os
import subprocess
import sys


def notebooks(config_dir):
    """A notebook folder beside the config dir."""
    path = config_dir.parent / f"{config_dir.name}-notebooks"
    path.mkdir(exist_ok=True)
    return path


def run_hostname(config_dir, *options):
    env = dict(os.environ, JUPYTER_CONFIG_PATH=str(config_dir))
    # Not from the config dir itself: a kernel may not write its launcher's settings.
    proc = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *options, "--",
                           "/bin/cat", "/proc/sys/kernel/hostname"],
                          capture_output=True, text=True, env=env, cwd=notebooks(config_dir),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_config_file_then_command_line(tmp_path):
    os.chmod(tmp_path, 0o755)
    assert run_hostname(tmp_path).startswith("isolated-")
    (tmp_path / "ns_kernel_config.py").write_text("c.Sandbox.hostname_prefix = 'frompy'\n")
    assert run_hostname(tmp_path).startswith("frompy-")
    (tmp_path / "ns_kernel_config.json").write_text(
        json.dumps({"Sandbox": {"hostname_prefix": "fromjson"}}))
    assert run_hostname(tmp_path).startswith("fromjson-")    # traitlets: .json after .py
    assert run_hostname(tmp_path, "--Sandbox.hostname_prefix=cli").startswith("cli-")


def test_bad_value_in_config_file(tmp_path):
    os.chmod(tmp_path, 0o755)
    (tmp_path / "ns_kernel_config.py").write_text("c.Sandbox.network = 'internet'\n")
    env = dict(os.environ, JUPYTER_CONFIG_PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--", "/bin/true"],
                          capture_output=True, text=True, env=env, cwd=notebooks(tmp_path),
                          timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ns-kernel: ") and "internet" in lines[0], lines
