"""Kernelspec writing as a stack of small functions (as ipykernel's kernelspec.py does):
argv -> kernel.json dict -> files in a directory -> installed with jupyter_client."""
import json
import os
import sys
import tempfile

NAME = "isolated-python"
DISPLAY_NAME = "Isolated Python"
PROVISIONER = "ns-kernel-provisioner"
# kernel.json fields taken as ipykernel's own spec has them (metadata too, with ours added).
SAME_AS_IPYKERNEL = ("language", "kernel_protocol_version")


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


def kernel_dict(options=(), display_name=DISPLAY_NAME, provisioner=True, debugger=True):
    """provisioner: name ours in metadata, so jupyter_client >= 7 clients (JupyterLab,
    nbclient) connect to the kernel's sockets directly; older clients use argv alone.

    The kernel inside is ipykernel, so the spec declares what ipykernel's own spec does
    (ipykernel 7: the debugger, CurveZMQ transport encryption, the protocol version):
    JupyterLab shows its debugger by `debugger`, and jupyter_client provisions Curve keys
    only for a spec whose `supported_encryption` says "curve". debugger: False for a kernel
    without a loopback (--network none), where debugpy has nowhere to listen."""
    from ipykernel.kernelspec import get_kernel_dict
    plain = get_kernel_dict()
    metadata = dict(plain["metadata"])
    if not debugger:
        metadata["debugger"] = False
    if provisioner:
        metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER, "config": {}}
    return {
        "argv": kernel_argv(options),
        "display_name": display_name,
        **{key: plain[key] for key in SAME_AS_IPYKERNEL if key in plain},
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


# Isolated Python's logo, beside kernel.json: JupyterLab's launcher shows it, not a letter.
LOGOS = os.path.join(os.path.dirname(__file__), "logos")


def write_kernel_spec(path, spec):
    import shutil
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
    for name in os.listdir(LOGOS):
        shutil.copyfile(os.path.join(LOGOS, name), os.path.join(path, name))
    return path


def install_command(name, changes=()):
    """The `ns-kernel install` command, one line for a shell, that writes the kernelspec
    `name` again where Jupyter finds it now (JupyterLab's terminal: the full path of this
    interpreter's ns-kernel, the scope of the dir it is in), with its display name and
    options, but those `changes` says otherwise (e.g. `--network proxy`: every other
    `--network` option goes); None if Jupyter finds no spec of ns-kernel's of that name, or
    none where install writes (a JUPYTER_PATH dir that is no PREFIX/share/jupyter)."""
    import shlex
    from jupyter_core.paths import jupyter_data_dir, jupyter_path
    from .argv import COLD, PRESTARTED
    from .config import SANDBOX_ALIASES
    found = next((d for d in jupyter_path("kernels")
                  if os.path.isfile(os.path.join(d, name, "kernel.json"))), None)
    try:
        with open(os.path.join(found, name, "kernel.json")) as f:
            spec = json.load(f)
        start = launcher_start(spec["argv"])
    except (TypeError, OSError, ValueError, KeyError):
        return None
    if start is None:
        return None
    here = os.path.realpath(found)
    share = os.path.join("share", "jupyter", "kernels")
    if here == os.path.realpath(os.path.join(sys.prefix, share)):
        scope = ["--sys-prefix"]
    elif here == os.path.realpath(os.path.join(jupyter_data_dir(), "kernels")):
        scope = ["--user"]
    elif here.endswith(os.sep + share):
        scope = ["--prefix", here[:-len(share) - 1] or "/"]
    else:
        return None

    def trait(option):
        word = option.partition("=")[0].removeprefix("--")
        return SANDBOX_ALIASES.get(word, word)
    replaced = {trait(option) for option in changes if option.startswith("--")}
    kept, skip = [], False
    for option in start.options + ([COLD] if start.how == PRESTARTED else []):
        if skip:
            skip = False
        elif option.startswith("--") and trait(option) in replaced:
            skip = "=" not in option      # its value follows
        else:
            kept.append(option)
    script = os.path.join(os.path.dirname(sys.executable), "ns-kernel")
    program = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "ns_kernel"]
    display = spec.get("display_name", DISPLAY_NAME)
    return shlex.join([*program, "install", *scope,
                       *(["--name", name] if name != NAME else []),
                       *(["--display-name", display] if display != DISPLAY_NAME else []),
                       *kept, *changes])


def install(name=NAME, spec=None, user=False, prefix=None):
    """Install into Jupyter's kernel dirs; returns the directory written."""
    from jupyter_client.kernelspec import KernelSpecManager
    from .errors import SetupError
    with tempfile.TemporaryDirectory() as tmp:
        write_kernel_spec(os.path.join(tmp, name), spec or kernel_dict())
        try:
            return KernelSpecManager().install_kernel_spec(os.path.join(tmp, name), name,
                                                           user=user, prefix=prefix)
        except OSError as exc:
            where = "your own (--user)" if user else prefix or "the system's"
            raise SetupError("install", f"install kernelspec {name} into {where} kernels dir",
                             "", exc.errno, "" if user or prefix else (
                                 "only root may write there: add --user, --sys-prefix or "
                                 "--prefix P")) from None
