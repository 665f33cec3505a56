"""What the notebooks share: find the repository, run its scripts in subprocesses, read their JSONL
logs.

The notebooks never parse printed text: every script they run writes one JSON object per line
(`--log_file`), and `read_jsonl` reads it back. Scratch files (logs, snapshots) go to a temporary
directory that is removed when the kernel exits, so running a notebook leaves the repository clean.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The test suite sets DDP_STEPS_REPO (it runs a copy of each notebook elsewhere); otherwise this
# file's own location says where the repository is: it lives in <repo>/notebooks/.
REPO = Path(os.environ.get("DDP_STEPS_REPO") or Path(__file__).resolve().parents[1]).resolve()

# Quick mode: the test suite sets NB_QUICK=1 and the notebooks then run fewer epochs, steps and
# processes, so that every cell (and every assert in it) still runs, in a fraction of the time.
# Opened by hand, a notebook runs its full sizes, the ones its text and committed pictures describe.
QUICK = os.environ.get("NB_QUICK") == "1"

sys.path.insert(0, str(REPO / "tools"))
import proc as _proc  # noqa: E402  (tools/proc.py: a time limit that ends all of a command)

SCRATCH = Path(tempfile.mkdtemp(prefix="ddp-steps-notebook-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def setup_plots(dpi: int = 110, font_size: int = 11):
    """Figures readable on a projector: 110 dpi, and at least 11 pt for every text (titles, axis
    labels, tick labels, legends). Draw without `fontsize=` arguments and these apply everywhere."""
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.figsize": (9, 3.5),
            "font.size": font_size,
            "axes.titlesize": font_size + 1,
            "axes.labelsize": font_size,
            "xtick.labelsize": font_size,
            "ytick.labelsize": font_size,
            "legend.fontsize": font_size,
            "legend.title_fontsize": font_size,
            "figure.titlesize": font_size + 2,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def gpu_count() -> int:
    """GPUs the scripts would use (they pick NCCL and one GPU per process when there are any)."""
    import torch

    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type not in ("cuda", "xpu"):
        return 0
    return torch.accelerator.device_count()


def env_for(world_size: int) -> dict:
    """Environment for a run of `world_size` processes. The scripts use one GPU per process when
    there are GPUs; with fewer GPUs than processes this hides them (and says so), so the run uses
    the CPU."""
    gpus = gpu_count()
    if 0 < gpus < world_size:
        print(
            f"{gpus} GPU(s) here, fewer than {world_size} processes: this run uses the CPU and Gloo"
        )
        return worker_env(CUDA_VISIBLE_DEVICES="")
    return worker_env()


def worker_env(**extra) -> dict:
    """One thread per process (several share this machine's cores), output not buffered.
    CUDA_VISIBLE_DEVICES is left as it is: on a machine with GPUs the scripts use them."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_path(script) -> Path:
    """A script named relative to the repository root (e.g. "03_multigpu_torchrun.py"), or any path.
    """
    script = Path(script)
    return script if script.is_absolute() else REPO / script


def python_cmd(script, *args) -> list:
    """`python SCRIPT ARGS` with this kernel's interpreter (the repository's virtualenv)."""
    return [sys.executable, str(script_path(script)), *map(str, args)]


def torchrun_cmd(nproc: int, script, *args) -> list:
    """`torchrun --standalone --nproc-per-node N SCRIPT ARGS`: --standalone picks a free port
    itself."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(script_path(script)),
        *map(str, args),
    ]


def run(
    cmd,
    timeout: int = 300,
    show: int = 3,
    env=None,
    cwd=None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a command to completion in SCRATCH (or cwd); print its last `show` lines of output. A
    failure raises with the output's tail, so the notebook cell (and the test running it) fails;
    check=False returns it instead, for a command that is meant to fail. Past `timeout` seconds the
    command and every process it started are ended, and the cell fails."""
    cmd = [str(c) for c in cmd]
    proc = _proc.run(cmd, cwd=cwd or SCRATCH, env=env or worker_env(), timeout=timeout)
    if proc.timed_out:
        raise RuntimeError(
            f"still running after {timeout} s, stopped: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
        )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"exit code {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-3000:]}"
            f"\n--- stderr ---\n{proc.stderr[-3000:]}"
        )
    lines = proc.stdout.strip().splitlines()
    for line in lines[-show:] if show else []:
        print("  " + line)
    return proc


def read_jsonl(path) -> list:
    """One dict per line of a JSONL log."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fresh(name: str) -> Path:
    """A path in SCRATCH with nothing there yet (scripts append to logs and resume from snapshots).
    """
    path = SCRATCH / name
    if path.exists():
        path.unlink()
    return path


def value_grid(
    ax,
    rows,
    row_labels,
    title=None,
    fmt="{:g}",
    highlight=(),
    cmap="coolwarm",
    col_labels=None,
    symmetric=True,
    fontsize=11,
    shade=None,
):
    """Draw a table of numbers as coloured cells, annotated with their values.

    rows: one list of numbers per row (rows may differ in length; an empty row is drawn as
    "(nothing)"). highlight: (row, column) cells to outline, e.g. those that changed in the last
    step. shade: optional numbers in [0, 1], shaped like rows, to colour the cells by instead of
    their values."""
    import matplotlib
    import numpy as np

    width = max(1, max(len(r) for r in rows))
    values = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
    if shade is None:
        finite = values[np.isfinite(values)]
        top = float(np.abs(finite).max()) if finite.size else 1.0
        top = top or 1.0
        low = -top if symmetric else float(finite.min()) if finite.size else 0.0
        colours = values
    else:
        low, top = 0.0, 1.0
        colours = np.full((len(rows), width), np.nan)
        for i, r in enumerate(shade):
            colours[i, : len(r)] = r
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    ax.imshow(np.ma.masked_invalid(colours), cmap=colormap, vmin=low, vmax=top, aspect="auto")
    for i, r in enumerate(rows):
        if not r:
            ax.text(
                (width - 1) / 2,
                i,
                "(nothing)",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="grey",
            )
        for j, v in enumerate(r):
            level = (
                abs(colours[i, j]) / top
                if shade is None and symmetric
                else (colours[i, j] - low) / (top - low)
            )
            dark = level > 0.75  # white text on the darkest cells
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )
    for i, j in highlight:
        ax.add_patch(
            matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="#FF8C00")
        )
    ax.set_yticks(range(len(rows)), row_labels, fontsize=fontsize + 1)
    if col_labels is None:
        ax.set_xticks([])
    else:
        ax.set_xticks(range(len(col_labels)), col_labels, fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 2, loc="left")
