"""Run notebooks/tour.ipynb in two Isolated Python kernels at once; print what the first
saw, then both side by side with the host."""
import asyncio
import os
import shutil
import socket
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
TOUR = os.path.join(HERE, "..", "notebooks", "tour.ipynb")
# What the summary compares: (row, the first word of the tour's line that holds it).
ROWS = (("pid", "pid"), ("hostname", "hostname"), ("uid", "uid"),
        ("processes", "processes"), ("/tmp", "/tmp"), ("interfaces", "interfaces"),
        ("routes", "routes"), ("capabilities", "CapEff"))


def text_of(cell):
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "image/png" in out.get("data", {}):
            parts.append("[a plot, image/png]\n")
    return "".join(parts)


async def run_one(kernel_name, workdir, log):
    nb = nbformat.read(TOUR, as_version=4)
    # The kernels' own lines (the launcher's, e.g. what a kernel left in its /tmp) go to
    # the log, as they would to a Jupyter server's.
    await NotebookClient(nb, kernel_name=kernel_name, timeout=120).async_execute(
        cwd=workdir, stderr=log)
    return "".join(text_of(cell) for cell in nb.cells if cell.cell_type == "code")


def seen(text):
    """The tour's lines by their first word: {'hostname': 'isolated-3f2a9c1e', ...}."""
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def host():
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line)
    return {"pid": f"{os.getpid()} parent {os.getppid()}", "hostname": socket.gethostname(),
            "uid": f"{os.getuid()} gid {os.getgid()}",
            "processes": str(sum(p.isdigit() for p in os.listdir("/proc"))),
            "/tmp": f"{len(os.listdir('/tmp'))} entries",
            "interfaces": str([name for _, name in socket.if_nameindex()]),
            "routes": str(len(open("/proc/net/route").read().splitlines()) - 1),
            "CapEff": f"{status['CapEff'].strip()} NoNewPrivs {status['NoNewPrivs'].strip()}"}


async def main(kernel_name):
    # The notebook's folder is bound into the sandbox at its own path: one under /tmp (a
    # clone there) would show in the private /tmp. Its own folder elsewhere keeps the tour's
    # /tmp listing to what the kernel made there. Readable by nobody (root's sandbox).
    workdir = tempfile.mkdtemp(prefix="ns-kernel-tour-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    log = tempfile.TemporaryFile("w+")
    try:
        texts = await asyncio.gather(run_one(kernel_name, workdir, log),
                                     run_one(kernel_name, workdir, log))
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read())
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"===== what kernel 1 saw ({kernel_name}) =====\n{texts[0]}")
    log.seek(0)
    said = log.read().splitlines()
    if said:
        print("What the launchers said when the kernels ended (a Jupyter server logs it):")
        print("\n".join(f"  {line}" for line in said) + "\n")
    columns = [seen(texts[0]), seen(texts[1]), host()]
    width = max(len(c.get(key, "")) for c in columns[:2] for _, key in ROWS) + 2
    print("===== side by side =====")
    print(f"{'':14}{'kernel 1':{width}}{'kernel 2':{width}}this host")
    for row, key in ROWS:
        print(f"{row:14}" + "".join(f"{c.get(key, '?'):{width}}" for c in columns[:2])
              + columns[2][key])

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "isolated-python"))
