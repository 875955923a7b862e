"""The notebooks in notebooks/ are runnable demos: execute them in real isolated kernels."""
import os
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def run(name, kernel_name="isolated-python", cwd=None):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, kernel_name=kernel_name, timeout=120,
                   resources={"metadata": {"path": cwd or NOTEBOOKS}}).execute()
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"], nb


def test_tour_shows_the_sandbox(workdir):
    # Through the provisioner, as nbclient takes the installed kernelspec.
    from conftest import write_spec
    texts, nb = run("tour.ipynb", write_spec("isolated-python-provisioned", provisioner=True),
                    cwd=workdir)
    who, procs, files, net, privs = texts[:5]
    assert who.startswith("pid 2 parent 1\nhostname isolated-")
    assert f"uid {65534 if os.getuid() == 0 else os.getuid()} " in who
    assert "processes 2" in procs
    # Each says what it is (titles.py): init, and the kernel as its argv, inside paths only.
    assert procs.startswith(f"1 ns-kernel-init\n2 {sys.executable} -m ipykernel_launcher "
                            "-f /run/ns-kernel/connection.json "), procs
    # Only what this kernel wrote, and the notebook folder (under the host's /tmp here).
    assert f"/tmp {sorted(['scratch', os.path.basename(workdir)])}" in files
    assert "/usr Read-only file system" in files
    assert "interfaces ['lo']\nroutes 0" in net
    assert "CapEff 0000000000000000 NoNewPrivs 1" in privs
    assert "image/png" in nb.cells[-1].outputs[0]["data"]     # matplotlib inline works
