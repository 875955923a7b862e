"""Kernelspec writing as a stack of small functions (as ipykernel's kernelspec.py does):
argv -> kernel.json dict -> files in a directory -> installed with jupyter_client."""
import json
import os
import sys
import tempfile

NAME = "isolated-python"
DISPLAY_NAME = "Isolated Python"
PROVISIONER = "ns-kernel-provisioner"


# -P: `-m` would put the current directory (the notebook's, which its kernel may write)
# first on sys.path, and the launcher, outside the sandbox, would import from there.
LAUNCHER = ["-P", "-m", "ns_kernel"]


def kernel_argv(options=()):
    """Launcher options go before -f; whatever follows {connection_file} reaches ipykernel."""
    return [sys.executable, *LAUNCHER, *options, "-f", "{connection_file}"]


def launcher_start(argv):
    """The argv.KernelStart of a kernel.json argv made by kernel_argv (None if it is not
    `PYTHON -P -m ns_kernel [options] -f {connection_file} ...`)."""
    from .argv import kernel_start
    return kernel_start(argv[4:]) if argv[1:4] == LAUNCHER else None


def kernel_dict(options=(), display_name=DISPLAY_NAME, provisioner=True):
    """provisioner: name ours in metadata, so jupyter_client >= 7 clients (JupyterLab,
    nbclient) connect to the kernel's sockets directly; older clients use argv alone."""
    metadata = {"debugger": False}
    if provisioner:
        metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER, "config": {}}
    return {
        "argv": kernel_argv(options),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


def write_kernel_spec(path, spec):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
    return path


def install(name=NAME, spec=None, user=False, prefix=None):
    """Install into Jupyter's kernel dirs; returns the directory written."""
    from jupyter_client.kernelspec import KernelSpecManager
    with tempfile.TemporaryDirectory() as tmp:
        write_kernel_spec(os.path.join(tmp, name), spec or kernel_dict())
        return KernelSpecManager().install_kernel_spec(os.path.join(tmp, name), name,
                                                       user=user, prefix=prefix)
