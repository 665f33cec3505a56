"""Run notebooks top to bottom and save them with their outputs (what gets committed).

    .venv/bin/python tools/execute_notebooks.py                      # every notebook in notebooks/
    .venv/bin/python tools/execute_notebooks.py notebooks/05_mingpt.ipynb

The kernel is this interpreter (the virtualenv's Python, which has PyTorch), whatever Jupyter
kernels are or are not installed. GPUs are hidden, so the committed pictures show what a
laptop without a GPU shows, as the README says. Always at full size: an NB_QUICK=1 left in the
environment (the tests' quick mode) is ignored, so the outputs match the notebooks' text.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parents[1]
KERNEL = "ddp-steps-tools"


def write_kernel_spec(root: Path, name: str):
    """A Jupyter kernel spec in root/name that starts this interpreter (`-m ipykernel_launcher`), so
    the notebooks run with this virtualenv's packages whatever kernels are installed for the user.
    """
    spec = root / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"ddp-steps ({name})",
                "language": "python",
            }
        )
    )


def execute(path: Path, kernel_dir: str, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # timestamps of an earlier run
    km = KernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir])
    )
    # record_timing=False: no execution timestamps in the cells' metadata, so a re-run changes only
    # outputs
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL,
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(
        cleanup_kc=True
    )  # raises CellExecutionError (the file is left as it was) if a cell fails
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(
        description="Execute notebooks in place, saving their outputs."
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default: 600)")
    args = parser.parse_args()
    paths = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    os.environ.update(
        DDP_STEPS_REPO=str(REPO), CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1"
    )
    os.environ.pop("MPLBACKEND", None)  # an "Agg" would keep the figures out of the notebook
    os.environ.pop(
        "NB_QUICK", None
    )  # the committed outputs are the full-size runs the text describes
    with tempfile.TemporaryDirectory() as kernel_dir:
        write_kernel_spec(Path(kernel_dir), KERNEL)
        for path in paths:
            print(f"{path}: {execute(path.resolve(), kernel_dir, args.timeout):.1f} s", flush=True)


if __name__ == "__main__":
    main()
