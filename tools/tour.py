"""The tour: run every step of ddp-steps in order, with small settings, on this machine's hardware.

    make tour                          # creates .venv first, then runs this
    .venv/bin/python tools/tour.py --only 03,04

Each step runs in its own folder under runs/tour/ (snapshots and logs land there, not in
the repository). The command is shown before it runs, exactly as you would type it
(`python` meaning this interpreter), so you can copy it. A summary table comes last.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def gpu_count() -> int:
    """GPUs the steps would use: CUDA (NCCL) or Intel (XCCL) devices."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return torch.accelerator.device_count() if accelerator is not None and accelerator.type in ("cuda", "xpu") else 0


def processes_per_node(gpus: int) -> int:
    """One process per GPU where there are two or more; else two, which the steps put on the CPU (Gloo):
    a step uses GPUs only when there is one for every process."""
    return gpus if gpus >= 2 else 2


def describe(gpus: int) -> str:
    nproc = processes_per_node(gpus)
    if gpus >= 2:
        return f"{gpus} GPUs: {nproc} processes per step, NCCL"
    if gpus == 1:
        return (f"1 GPU: step 01 and a one-process fp16 run of 06 on the GPU; the {nproc}-process steps on the "
                f"CPU, Gloo")
    return f"no GPU: {nproc} CPU processes per step, Gloo"


def tour_steps(gpus: int):
    """(key, title, command, extra environment, log file the command writes)."""
    nproc = processes_per_node(gpus)
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", str(nproc)]
    step03 = ["03_multigpu_torchrun.py", "--save_every", "2"]
    steps = [
        ("01", "one device", ["python", "01_single_gpu.py", "--max_epochs", "5", "--log_file", "01.jsonl"],
         {}, "01.jsonl"),
        ("02", "DDP started by mp.spawn",
         ["python", "02_multigpu_mp_spawn.py", "--max_epochs", "5", "--log_file", "02.jsonl"], {}, "02.jsonl"),
        ("03", "torchrun, snapshots", [*torchrun, *step03, "--max_epochs", "4", "--log_file", "03a.jsonl"], {},
         "03a.jsonl"),
        ("03", "resume from the snapshot", [*torchrun, *step03, "--max_epochs", "6", "--log_file", "03b.jsonl"], {},
         "03b.jsonl"),
        # tools/faults.py makes the last rank raise at the start of epoch 7, on torchrun's first attempt only
        ("03", "a rank crashes, torchrun restarts",
         [*torchrun, "--max-restarts", "1", "tools/faults.py", "--crash-at-epoch", "7", *step03, "--max_epochs", "8",
          "--log_file", "03c.jsonl"], {}, "03c.jsonl"),
        ("04", "collectives", ["python", "04_collectives_intro.py"], {}, None),
        ("05", "a CPU cluster", [*torchrun, "05_singlenode_cpu.py", "--max_epochs", "5", "--log_file", "05.jsonl"],
         {}, "05.jsonl"),
        ("06", "mixed precision: fp32",
         [*torchrun, "06_amp.py", "--max_epochs", "3", "--dtype", "fp32", "--log_file", "fp32.jsonl"], {},
         "fp32.jsonl"),
        ("06", "mixed precision: bf16",
         [*torchrun, "06_amp.py", "--max_epochs", "3", "--dtype", "bf16", "--log_file", "bf16.jsonl"], {},
         "bf16.jsonl"),
        ("mingpt", "minGPT-ddp: train a small GPT",
         [*torchrun, "minGPT-ddp/main.py", "trainer.max_iters=200", "trainer.eval_interval=100",
          "trainer.snapshot_path=mingpt.pt", "trainer.log_file=mingpt.jsonl"], {}, "mingpt.jsonl"),
        ("mingpt", "minGPT-ddp: sample from it",
         ["python", "minGPT-ddp/sample.py", "--snapshot", "mingpt.pt", "--prompt", "def ", "--max-new-tokens",
          "200"], {}, None),
    ]
    if gpus == 1:  # the one GPU at work: mixed precision as a GPU runs it, fp16 with GradScaler
        steps.insert(9, ("06", "mixed precision on the GPU: fp16", ["torchrun", "--standalone", "--nproc-per-node",
                         "1", "06_amp.py", "--max_epochs", "3", "--dtype", "fp16", "--log_file", "fp16.jsonl"], {},
                         "fp16.jsonl"))
    return steps


def resolve(command):
    """`python x.py` -> this interpreter on the repository's x.py; `torchrun` -> python -m torch.distributed.run."""
    if command[0] == "python":
        head, rest = [sys.executable], command[1:]
    else:
        head, rest = [sys.executable, "-m", "torch.distributed.run"], command[1:]
    return head + [str(REPO / arg) if (REPO / arg).is_file() else arg for arg in rest]


def script_of(command):
    return next(arg for arg in command if arg.endswith(".py"))


def last_loss(log: Path):
    """The last loss (validation loss where there is one) in the JSON-lines log a step wrote."""
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    losses = [r["val_loss"] if r.get("val_loss") is not None else r.get("loss") for r in records]
    losses = [loss for loss in losses if loss is not None]
    return losses[-1] if losses else None


def main():
    parser = argparse.ArgumentParser(description="Run every step of ddp-steps in order with small settings.")
    parser.add_argument("--only", default=None, help="comma-separated steps to run, e.g. 01,03,mingpt")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "tour"), help="where the steps write (default: "
                        "runs/tour, emptied first)")
    args = parser.parse_args()
    gpus = gpu_count()
    print(f"ddp-steps tour on {describe(gpus)} | torch {torch.__version__} | {os.cpu_count()} CPU cores\n",
          flush=True)

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    wanted = set(args.only.split(",")) if args.only else None
    results = []
    for key, title, command, extra_env, log_name in tour_steps(gpus):
        if wanted and key not in wanted:
            continue
        if not (REPO / script_of(command)).is_file():
            results.append((key, title, "not present", 0.0, None))
            continue
        workdir = root / key  # steps with the same key share a folder: 03 resumes from its own snapshot
        workdir.mkdir(parents=True, exist_ok=True)
        env_text = "".join(f"{k}={v} " for k, v in extra_env.items())
        print(f"==> [{key}] {title}\n    $ {env_text}{shlex.join(command)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(resolve(command), cwd=workdir, env={**os.environ, **extra_env},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        seconds = time.perf_counter() - start
        # Gloo's abort at interpreter exit (README, troubleshooting): the step had finished, and said so.
        exit_abort = (proc.returncode != 0 and "terminate called without an active exception" in proc.stderr
                      and ("Finished training" in proc.stdout or "] Done: " in proc.stdout))
        ok = proc.returncode == 0 or exit_abort
        status = "ok" if proc.returncode == 0 else "ok (exit abort)" if exit_abort else f"FAILED (exit {proc.returncode})"
        if exit_abort:
            print("    note: the step finished, then a Gloo thread aborted the process at exit (a PyTorch bug, "
                  "see README troubleshooting); its results are complete", flush=True)
        results.append((key, title, status, seconds, last_loss(workdir / log_name) if ok and log_name else None))
        print(flush=True)

    print("Summary")
    print(f"  {'step':<7} {'what':<36} {'result':<18} {'seconds':>8}  final loss")
    for key, title, status, seconds, loss in results:
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        print(f"  {key:<7} {title:<36} {status:<18} {seconds:>8.1f}  {loss_text}")
    shown = root.relative_to(REPO) if root.is_relative_to(REPO) else root  # runs/tour, as the README says
    print(f"\nEverything the steps wrote is under {shown}")
    sys.exit(0 if all(r[2] in ("ok", "ok (exit abort)", "not present") for r in results) else 1)


if __name__ == "__main__":
    main()
