"""Run notebooks/tour.ipynb in two Isolated Python kernels at once and print what each saw."""
import asyncio
import os
import socket
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
TOUR = os.path.join(HERE, "..", "notebooks", "tour.ipynb")


def text_of(cell):
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "image/png" in out.get("data", {}):
            parts.append(f"[image/png, {len(out['data']['image/png'])} base64 bytes]\n")
    return "".join(parts)


async def run_one(kernel_name, workdir):
    nb = nbformat.read(TOUR, as_version=4)
    await NotebookClient(nb, kernel_name=kernel_name, timeout=120,
                         resources={"metadata": {"path": workdir}}).async_execute()
    return nb


async def main(kernel_name):
    workdir = os.path.dirname(os.path.abspath(TOUR))
    notebooks = await asyncio.gather(run_one(kernel_name, workdir), run_one(kernel_name, workdir))
    print(f"host: hostname {socket.gethostname()}, uid {os.getuid()}, "
          f"{sum(p.isdigit() for p in os.listdir('/proc'))} processes\n")
    for i, nb in enumerate(notebooks, 1):
        print(f"===== kernel {i} ({kernel_name}) =====")
        for cell in nb.cells:
            if cell.cell_type == "code":
                print(text_of(cell), end="")
        print()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "isolated-python"))
