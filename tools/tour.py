"""The tour: run every step of ddp-steps in order, with small settings, on this machine's hardware.

    make tour                          # creates .venv first, then runs this
    .venv/bin/python tools/tour.py --only 03,04

What runs where is planned from a description of this machine (tools/plan.py; docs/MACHINES.md
lists it for a laptop, a Mac, one T4 or A100, 2 T4s and 8 H100s): with two GPUs or more, every
step runs one process per GPU; otherwise the steps run 2 processes on the CPU, and a single GPU
gets step 01 and step 06 (mixed precision in its own dtype).

Each step runs in its own folder under runs/tour/ (snapshots and logs land there, not in the
repository), with a time limit. The command is shown before it runs, exactly as you would type it
in the repository's root (`python` meaning this interpreter), then its output, stdout and stderr
in the order they were printed. A summary table comes last.
"""
import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import plan
from plan import machine

REPO = plan.REPO


def describe(m: machine.Machine) -> str:
    n = plan.processes_per_node(m)
    if m.gpus_with_backend >= 2:
        return f"{m.describe()}: {n} processes per step, one per GPU"
    if m.gpus_with_backend == 1:
        return (f"{m.describe()}: steps 01 and 06 on the GPU; the {n}-process steps on the CPU "
                "(a step uses GPUs only with one for every process)")
    gpu = " (step 01 on it)" if m.accelerator else ""
    return f"{m.describe()}{gpu}: {n} CPU processes per step"


def last_loss(log: Path):
    """The last loss (validation loss where there is one) in the JSON-lines log a step wrote."""
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    losses = [r["val_loss"] if r.get("val_loss") is not None else r.get("loss") for r in records]
    losses = [loss for loss in losses if loss is not None]
    return losses[-1] if losses else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run every step of ddp-steps in order with small "
                                                 "settings.")
    parser.add_argument("--only", default=None, help="comma-separated steps, e.g. 01,03,mingpt")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "tour"),
                        help="where the steps write (default: runs/tour, emptied first)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    plan.require_torch()
    import torch
    here = machine.Machine.here()
    print(f"ddp-steps tour on {describe(here)} | torch {torch.__version__}\n", flush=True)

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    wanted = set(args.only.split(",")) if args.only else None
    results = []
    for step in plan.plan(here, "tour"):
        if wanted and step.key not in wanted:
            continue
        print(f"==> [{step.key}] {step.title}\n    $ {shlex.join(step.argv)}", flush=True)
        run = plan.execute(step, root)
        sys.stdout.write(run.output)
        status = plan.judge(run)
        if status != "ok":
            print(f"    {status}", flush=True)
        ok = status == "ok"
        loss = last_loss(run.folder / step.log_file) if ok and step.log_file else None
        results.append((step.key, step.title, status, run.seconds, loss))
        print(flush=True)

    print("Summary")
    print(f"  {'step':<7} {'what':<46} {'result':<18} {'seconds':>8}  final loss")
    for key, title, status, seconds, loss in results:
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        print(f"  {key:<7} {title:<46} {status:<18} {seconds:>8.1f}  {loss_text}")
    shown = root.relative_to(REPO) if root.is_relative_to(REPO) else root  # runs/tour, as in README
    print(f"\nEverything the steps wrote is under {shown}")
    sys.exit(0 if all(r[2].startswith("ok") for r in results) else 1)


if __name__ == "__main__":
    main()
