"""Every notebook in notebooks/ runs top to bottom, without an error, and draws at least one figure.

Each test executes a copy of the notebook in a temporary directory (the committed file, with its
outputs, is never rewritten) on a kernel that runs this very interpreter, so it works on a fresh
clone once `make test` has made .venv. The notebooks' subprocesses see no GPU here (CPU only, Gloo).
"""
import os
import shutil
import sys
import time

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


def test_committed_notebooks_are_executed_and_small():
    """The committed copies carry their outputs (GitHub shows the pictures), with no errors, kept small."""
    total = 0
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        outputs = [o for c in code for o in c.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} is committed without figures"
        assert not [o for o in outputs if o.output_type == "error"], f"{path.name} is committed with an error"
        total += os.path.getsize(path)
    assert total < 2 * 2**20, f"notebooks total {total / 2**20:.1f} MiB: lower the figures' dpi"
