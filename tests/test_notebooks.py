"""Every notebook in notebooks/ runs top to bottom in quick mode (NB_QUICK=1: fewer epochs and
steps) without an error, and the asserts in its cells hold: each notebook checks the findings it
prints. Its figures are at least 110 dpi with text of at least 11 points. The committed copies carry
their figures at that resolution and nothing of the machine that ran them.

The notebooks run through conftest's executed_notebook fixture: once per session, shared with
test_ddp_errors (which reads notebook 07's runs). Their subprocesses see no GPU here (CPU only,
Gloo)."""

import base64
import io
import json
import os
import re
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from conftest import NOTEBOOK_DIR, REPO

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MIN_DPI = 110  # nbutils.setup_plots: readable on a projector
MIN_FONT_PT = 11  # likewise


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, [p.name for p in NOTEBOOKS]


def figure_problems(run) -> list:
    """What is wrong with the figures an executed notebook drew: none drawn, any under MIN_DPI, any
    text under MIN_FONT_PT (measured by conftest's probe as each figure was shown)."""
    outputs = [o for cell in run.nb.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = [base64.b64decode(o["data"]["image/png"]) for o in outputs
               if "image/png" in o.get("data", {})]
    if not figures:
        return ["no figure"]
    assert len(run.font_sizes) == len(figures), (run.font_sizes, len(figures))  # probe saw each
    # (the PNG stores dots per metre: 110 dpi comes back as 109.9998)
    low = [dpi and round(dpi) for dpi in map(png_dpi, figures) if dpi is None or dpi < MIN_DPI - 0.5]
    small = [size for size in run.font_sizes if size is not None and size < MIN_FONT_PT]
    return ([f"figures at {low} dpi, below {MIN_DPI}"] if low else []) + (
        [f"text of {small} pt, below {MIN_FONT_PT} pt"] if small else [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, executed_notebook):
    run = executed_notebook(path.name)  # a failing cell or assert fails here, with its traceback
    assert not figure_problems(run), (path.name, figure_problems(run))
    # Running it left nothing behind in notebooks/ (scratch goes to a temporary folder).
    assert not run.left_behind
    print(f"{path.name}: {run.seconds:.1f} s")


def test_the_figure_checks_can_fail(executed_notebook, tmp_path):
    """A notebook that draws without nbutils.setup_plots (matplotlib's 100 dpi) and an 8-pt title,
    run as the notebooks are: both problems are found."""
    path = tmp_path / "small_print.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1])\n"
        "ax.set_title('small print', fontsize=8)\nplt.show()")]), path)
    assert figure_problems(executed_notebook(str(path))) == [
        "figures at [100] dpi, below 110", "text of [8.0] pt, below 11 pt"]


# What must never be in a committed output: paths of the machine that ran it (the repository, the
# home folder, temporary folders, the virtualenv) and its name. Images are not searched (base64
# data).
HOME = str(Path.home())
LOCAL = [
    "/work/",
    "/tmp/",
    tempfile.gettempdir().rstrip("/") + "/",
    "/root/",
    "site-packages",
    str(REPO),
    *([HOME] if HOME not in ("/", "") else []),
]
HOSTNAME = re.compile(rf"\b{re.escape(socket.gethostname())}\b")


def output_texts(nb):
    """Every text a notebook's saved outputs show: printed streams, results, errors (not image
    data)."""
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
    """The resolution matplotlib wrote into a PNG (its pHYs chunk), in dots per inch; None without
    one."""
    position = 8
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        if kind == b"pHYs":
            x_per_metre, _, unit = struct.unpack(">IIB", png[position + 8 : position + 17])
            return x_per_metre * 0.0254 if unit == 1 else None
        position += 12 + length
    return None


def test_the_committed_output_checks_can_fail():
    """The checks below on something that must fail them, and on something that must pass."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [
        nbformat.v4.new_output(
            "stream", name="stdout", text=f"Writing {tempfile.gettempdir()}/x/probe.py\n"
        )
    ]
    assert machine_local(nb)
    nb.cells[0].outputs = [
        nbformat.v4.new_output("execute_result", data={"text/plain": f"'{REPO}/notebooks'"})
    ]
    assert machine_local(nb)
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="Writing probe.py\nloss 0.0123\n")
    ]
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
    """The committed copy carries its outputs (GitHub shows the pictures) without errors, its
    figures at projector resolution, and nothing of the machine that ran it."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    pictures = [
        base64.b64decode(o["data"]["image/png"])
        for o in outputs
        if "image/png" in o.get("data", {})
    ]
    assert pictures, f"{path.name} is committed without figures"
    assert not [
        o for o in outputs if o.output_type == "error"
    ], f"{path.name} is committed with an error"
    low = [dpi for dpi in map(png_dpi, pictures) if dpi is None or dpi < MIN_DPI - 0.5]
    assert (
        not low
    ), f"{path.name}: figures at {low} dpi, below {MIN_DPI}: run it again (nbutils.setup_plots)"
    assert not machine_local(
        nb
    ), f"{path.name} shows this machine's paths or name: {machine_local(nb)}"
    assert os.path.getsize(path) < 2**20, f"{path.name} is over 1 MiB: smaller figures"


def test_committed_notebooks_stay_small_together():
    total = sum(os.path.getsize(path) for path in NOTEBOOKS)
    assert total < 4 * 2**20, f"notebooks total {total / 2**20:.1f} MiB: smaller figures"
