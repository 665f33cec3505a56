"""One command that proves the GPU path: `make gpu-check` on a machine with one or more NVIDIA GPUs.

It runs every step on the GPU(s) (NCCL, fp16 with GradScaler, bf16 where the GPU has it natively), the
tests that only run where CUDA is, and minGPT-ddp's benchmark with gpt2_train_cfg.yaml (tokens/s, MFU),
each with small settings (under 10 minutes in all), then prints one table. Paste the table into
minGPT-ddp/README.md. Every run writes under runs/gpu-check/.

    make gpu-check
    .venv/bin/python tools/gpu_check.py --only 06,bench
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


def checks(gpus: int, bf16: bool):
    """(key, what, command, the text the output must contain)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus)]
    nccl = "backend nccl" if gpus else "backend gloo"
    plan = [
        ("01", "one GPU", [sys.executable, "01_single_gpu.py", "--max_epochs", "2"], "[cuda:0] device cuda"),
        ("02", f"mp.spawn, {gpus} GPU(s)", [sys.executable, "02_multigpu_mp_spawn.py", "--world_size", str(gpus),
                                            "--max_epochs", "2"], nccl),
        ("03", "torchrun + snapshot", [*torchrun, "03_multigpu_torchrun.py", "--max_epochs", "2"], nccl),
        ("03", "resume", [*torchrun, "03_multigpu_torchrun.py", "--max_epochs", "3"], "Resuming training"),
        ("04", "collectives", [sys.executable, "04_collectives_intro.py"], "device"),
        ("05", "validation over ranks", [*torchrun, "05_singlenode_cpu.py", "--max_epochs", "2"], nccl),
        ("06", "fp16 + GradScaler", [*torchrun, "06_amp.py", "--dtype", "fp16", "--max_epochs", "2"],
         "GradScaler on"),
        ("06", "GradScaler skips an inf step", [*torchrun, "tools/faults.py", "--inf-at-step", "40", "06_amp.py",
                                                "--dtype", "fp16", "--max_epochs", "1", "--snapshot_path", "inf.pt"],
         "GradScaler skipped the step"),
        ("tests", "CUDA-only tests", [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider",
                                      str(REPO / "tests")], " passed"),
        ("bench", "minGPT-ddp, gpt2_train_cfg.yaml", [sys.executable, "minGPT-ddp/bench.py", "--nproc", str(gpus),
                                                     "--iters", "40", "--warmup", "10", "--windows", "4",
                                                     "config=minGPT-ddp/gpt2_train_cfg.yaml"], "BENCH_RESULT"),
    ]
    if bf16:
        plan.insert(7, ("06", "bf16", [*torchrun, "06_amp.py", "--dtype", "bf16", "--max_epochs", "2"],
                        "autocast bfloat16"))
    return plan


def resolve(command):
    return [str(REPO / arg) if arg.endswith(".py") and (REPO / arg).is_file() else arg for arg in command]


def detail(key: str, stdout: str) -> str:
    if key == "bench":
        for line in stdout.splitlines():
            if line.startswith("BENCH_RESULT "):
                r = json.loads(line.removeprefix("BENCH_RESULT "))
                return (f"{r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.1f}% of "
                        f"{r['peak_flops_per_rank'] / 1e12:.0f} TFLOP/s per GPU ({r['peak_source']}) | {r['dtype']}")
    first = next((line for line in stdout.splitlines() if " device " in line), "")
    return first.split("] ", 1)[-1][:70]


def main():
    parser = argparse.ArgumentParser(description="Run every step, the CUDA-only tests and minGPT-ddp's benchmark "
                                                 "on this machine's NVIDIA GPU(s); print one table.")
    parser.add_argument("--only", default=None, help="comma-separated keys: 01,02,03,04,05,06,tests,bench")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: gpu-check needs an NVIDIA GPU, and PyTorch sees none here "
                         "(torch.cuda.is_available() is False)")
    gpus = torch.cuda.device_count()
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    print(f"gpu-check | {gpus} x {', '.join(names)} | native bf16: {bf16} | torch {torch.__version__} | "
          f"CUDA {torch.version.cuda}", flush=True)
    root = REPO / "runs" / "gpu-check"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for key, what, command, expected in checks(gpus, bf16):
        if wanted and key not in wanted:
            continue
        print(f"==> [{key}] {what}\n    $ {shlex.join(command)}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" or v}
        start = time.perf_counter()
        proc = subprocess.run(resolve(command), cwd=root, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=480)
        seconds = time.perf_counter() - start
        ok = proc.returncode == 0 and expected in proc.stdout
        rows.append((key, what, "ok" if ok else f"FAILED (exit {proc.returncode})", seconds, detail(key, proc.stdout)))
        if not ok:
            print(proc.stdout[-2000:] + proc.stderr[-3000:], flush=True)
    print(f"\n| check | what | result | seconds | detail |\n|---|---|---|---:|---|")
    for key, what, result, seconds, text in rows:
        print(f"| {key} | {what} | {result} | {seconds:.1f} | {text} |")
    sys.exit(0 if all(row[2] == "ok" for row in rows) else 1)


if __name__ == "__main__":
    main()
