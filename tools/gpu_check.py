"""One command that proves what only NVIDIA GPUs can: `make gpu-check` on a machine with some.

`make tour` already runs every step on the GPUs (DDP over NCCL, step 06 in the GPU's mixed
precision, minGPT-ddp with the 25M-parameter GPT). gpu-check adds, on all the GPUs of this machine:
  06      step 06 in fp16: one rank's loss made inf at step 5, every rank skips the step;
  fsdp    minGPT-ddp under FSDP in float16 with GradScaler, deterministic kernels;
  resume  the same run, its last rank killed at step 30, restarted by torchrun, resumed from the
          snapshot: it must end with the same weights, AdamW state and scaler, bit for bit;
  bench   minGPT-ddp under DDP, dtype auto (bf16 where native, else fp16), compiled: tokens/s, MFU.
Each row has a time limit that ends all its processes, and the table is printed whatever happens.
Paste the table into docs/MACHINES.md. Every run writes under runs/gpu-check/.

    make gpu-check
    .venv/bin/python tools/gpu_check.py --only fsdp,resume
    .venv/bin/python tools/gpu_check.py --on-cpu --machine 8xh100   # the same rows on this CPU

--on-cpu runs the rows planned for a machine (this one, or an example: tools/plan.py) on the CPU,
CUDA hidden, with a tiny GPT: what the tests do, so that the rows cannot rot between GPU loans.
"""
import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import plan
from plan import machine

REPO = plan.REPO


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 06's GradScaler and minGPT-ddp's FSDP, resume and compiled benchmark "
                    "rows on this machine's NVIDIA GPU(s), in one table.")
    parser.add_argument("--only", default=None, help="comma-separated: 06,fsdp,resume,bench")
    parser.add_argument("--on-cpu", action="store_true",
                        help="run the rows on the CPU, CUDA hidden, with a tiny GPT (as the tests)")
    parser.add_argument("--machine", choices=list(machine.EXAMPLES), default=None,
                        help="with --on-cpu: plan for this example machine instead of this one")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "gpu-check"),
                        help="where the rows write (default: runs/gpu-check, emptied first)")
    args = parser.parse_args(argv)
    if args.machine and not args.on_cpu:
        parser.error("--machine plans for another machine, whose GPUs are not here: add --on-cpu")
    return args


def detail(run: plan.Run, status: str) -> str:
    lines = run.output.splitlines()
    r = plan.last_record(run.folder / run.step.log_file) if run.step.key == "bench" else {}
    if "tokens_per_s" in r:
        return (f"{r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.1f}% of "
                f"{r['peak_flops_per_rank'] / 1e12:.1f} TFLOP/s per {r['device']} rank "
                f"({r['peak_source']}) | {r['dtype']} | compile {'on' if r['compile'] else 'off'}")
    skip = next((line for line in lines if "inf injected" in line), "")
    if skip:
        return skip.split("] ", 1)[-1][:90]
    if run.step.same_state and status == "ok":
        return f"{' and '.join(run.step.same_state)}: same step, weights, AdamW state and scaler"
    first = next((line for line in lines if " device " in line), "")
    return first.split("] ", 1)[-1][:70]


def main(argv=None):
    args = parse_args(argv)
    plan.require_torch()
    import torch
    if args.on_cpu:
        here = machine.Machine.here()
        if args.machine is None and here.accelerator != "cuda":
            raise SystemExit("error: --on-cpu plans for this machine's NVIDIA GPUs, and it has "
                             f"none: add --machine NAME ({', '.join(machine.EXAMPLES)})")
        target = machine.EXAMPLES[args.machine] if args.machine else here
        steps = plan.plan(target, "gpu-check", on_cpu=True)
        env = {**os.environ, **plan.CPU_SWITCH}
        if not steps:
            raise SystemExit(f"error: {args.machine} has no NVIDIA GPU: gpu-check plans nothing "
                             "for it")
        print(f"gpu-check --on-cpu | planned for {target.describe()} | run on this CPU, CUDA "
              f"hidden, tiny GPT | torch {torch.__version__}", flush=True)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: gpu-check needs an NVIDIA GPU, and PyTorch sees none here "
                             "(torch.cuda.is_available() is False)")
        here = machine.Machine.here()
        steps = plan.plan(here, "gpu-check")
        env = None
        print(f"gpu-check | {here.describe()} | torch {torch.__version__} | "
              f"CUDA {torch.version.cuda}", flush=True)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for step in steps:
        if wanted and step.key not in wanted:
            continue
        print(f"==> [{step.key}] {step.title}\n    $ {shlex.join(step.argv)}", flush=True)
        run = plan.execute(step, root, env)
        status = plan.judge(run)
        print(f"    {status} in {run.seconds:.0f} s", flush=True)
        if not status.startswith("ok"):
            print(run.output[-5000:], flush=True)
        rows.append((step.key, step.title, status, run.seconds, detail(run, status)))
    print("\n| check | what | result | seconds | detail |\n|---|---|---|---:|---|")
    for key, what, result, seconds, text in rows:
        print(f"| {key} | {what} | {result} | {seconds:.1f} | {text} |")
    sys.exit(0 if all(row[2].startswith("ok") for row in rows) else 1)


if __name__ == "__main__":
    main()
