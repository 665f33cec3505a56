"""Every notebook in notebooks/ runs top to bottom, without an error, and draws at least one figure; the
committed copies carry their figures at projector resolution and nothing of the machine that ran them.

Each test executes a copy of the notebook in a temporary directory (the committed file, with its
outputs, is never rewritten) on a kernel that runs this very interpreter, so it works on a fresh
clone once `make test` has made .venv. The notebooks' subprocesses see no GPU here (CPU only, Gloo).
"""
import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (comes with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
from execute_notebooks import write_kernel_spec  # noqa: E402  (the kernel that tools/ runs notebooks with)

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "ddp-steps-test"
CELL_TIMEOUT = 300  # s; the slowest cell starts a few torchrun runs


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec that starts `sys.executable -m ipykernel_launcher`: the venv running the tests,
    whatever kernels (or none) are installed for the user or the system."""
    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root, KERNEL)
    return root


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path, kernel_dir, monkeypatch):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:  # start from nothing: the committed outputs must not count
        if cell.cell_type == "code":
            cell.outputs = []
    # The kernel inherits this environment: where the repository is (the copy lives elsewhere), no GPU,
    # and no MPLBACKEND (a CI's "Agg" would stop the kernel from drawing figures inline, as Jupyter does).
    monkeypatch.setenv("DDP_STEPS_REPO", str(REPO))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no __pycache__ in notebooks/
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        # Raises CellExecutionError, with the cell and its traceback, if a cell fails. cleanup_kc: shut the
        # kernel down afterwards although we made its manager (its atexit then removes its scratch files).
        client.execute(cleanup_kc=True)
    finally:
        nbformat.write(nb, copy)  # what ran, for a look after a failure (pytest keeps tmp_path)
    seconds = time.perf_counter() - start

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} drew no figure"
    # Running it left nothing behind in the repository's notebooks/ folder (scratch goes to a temp dir).
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before
    print(f"{path.name}: {seconds:.1f} s, {len(figures)} figure(s)")


# What must never be in a committed output: paths of the machine that ran it (the repository, the home
# folder, temporary folders, the virtualenv) and its name. Images are not searched (base64 data).
HOME = str(Path.home())
LOCAL = ["/work/", "/tmp/", tempfile.gettempdir().rstrip("/") + "/", "/root/", "site-packages", str(REPO),
         *([HOME] if HOME not in ("/", "") else [])]
HOSTNAME = re.compile(rf"\b{re.escape(socket.gethostname())}\b")
MIN_DPI = 110  # nbutils.setup_plots: readable on a projector


def output_texts(nb):
    """Every text a notebook's saved outputs show: printed streams, results, errors (not image data)."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                yield out["text"]
            for mime, value in out.get("data", {}).items():
                if not mime.startswith("image/"):
                    yield value if isinstance(value, str) else json.dumps(value)
            yield from out.get("traceback", [])


def machine_local(nb) -> list:
    """The lines of saved outputs that name this machine's paths or its hostname."""
    found = []
    for text in output_texts(nb):
        for line in text.splitlines():
            if any(local in line for local in LOCAL) or HOSTNAME.search(line):
                found.append(line.strip()[:160])
    return found


def png_dpi(png: bytes):
    """The resolution matplotlib wrote into a PNG (its pHYs chunk), in dots per inch; None without one."""
    position = 8
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        if kind == b"pHYs":
            x_per_metre, _, unit = struct.unpack(">IIB", png[position + 8:position + 17])
            return x_per_metre * 0.0254 if unit == 1 else None
        position += 12 + length
    return None


def test_the_committed_output_checks_can_fail():
    """The checks below on something that must fail them, and on something that must pass."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"Writing {tempfile.gettempdir()}/x/probe.py\n")]
    assert machine_local(nb)
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": f"'{REPO}/notebooks'"})]
    assert machine_local(nb)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="Writing probe.py\nloss 0.0123\n")]
    assert not machine_local(nb)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for dpi in (80, 110):
        fig = plt.figure(figsize=(2, 1), dpi=dpi)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        plt.close(fig)
        assert round(png_dpi(buffer.getvalue())) == dpi


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_executed_readable_and_clean(path):
    """The committed copy carries its outputs (GitHub shows the pictures) without errors, its figures at
    projector resolution, and nothing of the machine that ran it."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    pictures = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert pictures, f"{path.name} is committed without figures"
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} is committed with an error"
    low = [dpi for dpi in map(png_dpi, pictures) if dpi is None or dpi < MIN_DPI - 0.5]
    assert not low, f"{path.name}: figures at {low} dpi, below {MIN_DPI}: run it again (nbutils.setup_plots)"
    assert not machine_local(nb), f"{path.name} shows this machine's paths or name: {machine_local(nb)}"
    assert os.path.getsize(path) < 2**20, f"{path.name} is over 1 MiB: smaller figures"


def test_committed_notebooks_stay_small_together():
    total = sum(os.path.getsize(path) for path in NOTEBOOKS)
    assert total < 4 * 2**20, f"notebooks total {total / 2**20:.1f} MiB: smaller figures"
