"""Training throughput (tokens/s) and MFU of a config at a given world size, measured on
the same train_step that main.py runs; and DDP weak scaling.

usage:
  python minGPT-ddp/bench.py [options] [config=FILE] [key=value ...]

  python minGPT-ddp/bench.py config=minGPT-ddp/shakespeare_cpu_cfg.yaml    one process, all cores
  python minGPT-ddp/bench.py --nproc 2 --threads 1                          2 ranks (torchrun inside)
  python minGPT-ddp/bench.py --weak-scaling --nproc 2 --threads 1           1 rank vs 2 ranks, same per-rank batch
  torchrun --standalone --nproc-per-node 8 minGPT-ddp/bench.py              8 GPUs

Weak scaling keeps the per-rank batch fixed, so N ranks do N times the work per step;
efficiency = tokens/s of N ranks / (N x tokens/s of 1 rank). 1.0 means communication
costs nothing. The 1-rank run is a plain process without DDP: the baseline to beat.
The config keys and their defaults are main.py's (see python minGPT-ddp/main.py --help).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import config
import ddp_setup
from char_dataset import CharData
from model import GPT
from trainer import Trainer

RESULT_PREFIX = "BENCH_RESULT "  # the line a worker prints for the process that launched it


def parse_args():
    parser = argparse.ArgumentParser(usage="python minGPT-ddp/bench.py [options] [config=FILE] [key=value ...]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=5,
                        help="split the timed steps into this many windows and report the best and the median: "
                             "on a shared machine some windows lose the CPU to others (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks to start with torchrun (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per rank on CPU (default: as it is; 1 with --weak-scaling)")
    parser.add_argument("--weak-scaling", action="store_true", help="run 1 rank, then --nproc ranks, compare")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by launch()
    args, overrides = parser.parse_known_args()
    if args.iters < args.windows or args.windows < 1 or args.warmup < 0 or args.nproc < 1:
        raise SystemExit("error: need --iters >= --windows >= 1, --warmup >= 0 and --nproc >= 1")
    return args, overrides


def measure(args, overrides):
    """Run in every rank: warm up, time --iters steps, print one result line on rank 0."""
    cfg, config_path, _ = config.load(overrides)
    data = CharData(cfg.data, cfg.model.block_size)
    rt = ddp_setup.start()
    try:
        torch.manual_seed(cfg.trainer.seed)
        trainer = Trainer(cfg, GPT(cfg.model, len(data.vocab)), data, rt)
        for it in range(args.warmup):
            trainer.train_step(it)
        steps_per_window = args.iters // args.windows
        window_seconds = []
        for window in range(args.windows):
            synchronize(rt)
            start = time.perf_counter()
            for i in range(steps_per_window):
                loss = trainer.train_step(args.warmup + window * steps_per_window + i)
            loss.item()  # waits for the GPU
            synchronize(rt)  # the slowest rank sets the pace
            window_seconds.append(time.perf_counter() - start)
        tokens = steps_per_window * trainer.tokens_per_step
        best, median = tokens / min(window_seconds), tokens / statistics.median(window_seconds)
        peak_all_ranks = trainer.peak_flops * rt.world_size
        result = {
            "config": str(config_path), "overrides": [o for o in overrides],
            "device": rt.device.type, "world_size": rt.world_size,
            "threads_per_rank": torch.get_num_threads() if rt.device.type == "cpu" else None,
            "params": trainer.raw_model.num_params(), "flops_per_token": trainer.raw_model.flops_per_token(),
            "tokens_per_step": trainer.tokens_per_step, "dtype": str(trainer.dtype).removeprefix("torch."),
            "compile": cfg.trainer.compile, "tokens_per_s": round(best, 1), "tokens_per_s_median": round(median, 1),
            "ms_per_step": round(1000 * min(window_seconds) / steps_per_window, 2),
            "mfu": round(best * trainer.raw_model.flops_per_token() / peak_all_ranks, 4),
            "peak_flops_per_rank": trainer.peak_flops, "peak_source": trainer.peak_source,
        }
        threads = f" x {result['threads_per_rank']} thread(s)" if rt.device.type == "cpu" else ""
        rt.print(f"bench | {rt.world_size} rank(s){threads} | {result['tokens_per_step']:,} tokens/step | "
                 f"{best:,.0f} tok/s (median {median:,.0f}) | {best / rt.world_size:,.0f} tok/s per rank | "
                 f"{result['ms_per_step']:.1f} ms/step | mfu {100 * result['mfu']:.1f}% of {peak_all_ranks / 1e9:,.0f} "
                 f"GFLOP/s ({trainer.peak_source})")
        if rt.is_main:
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result
    finally:
        ddp_setup.stop(rt)


def synchronize(rt):
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    if rt.distributed:
        dist.barrier()


def launch(nproc: int, threads, args, overrides) -> dict:
    """Start the measurement as a child: a plain process for 1 rank, torchrun for more."""
    script = str(Path(__file__).resolve())
    worker_args = ["--worker", "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--windows", str(args.windows), *overrides]
    if nproc == 1:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               script, *worker_args]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines()
        raise SystemExit(f"error: the {nproc}-rank benchmark failed (exit {proc.returncode}): "
                         f"{errors[-1] if errors else 'no output'}")
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            print(line, flush=True)
    return results[0]


def main():
    args, overrides = parse_args()
    if args.worker or "WORLD_SIZE" in os.environ:  # under torchrun, or started by launch()
        measure(args, overrides)
        return
    if args.weak_scaling:
        if args.nproc < 2:
            raise SystemExit("error: --weak-scaling needs --nproc 2 or more")
        threads = args.threads or 1
        one = launch(1, threads, args, overrides)
        many = launch(args.nproc, threads, args, overrides)
        efficiency = many["tokens_per_s"] / (args.nproc * one["tokens_per_s"])
        print(f"weak scaling | {one['device']} | {threads} thread(s) per rank | 1 rank {one['tokens_per_s']:,.0f} tok/s"
              f" | {args.nproc} ranks {many['tokens_per_s']:,.0f} tok/s | efficiency {efficiency:.2f}", flush=True)
        print(RESULT_PREFIX + json.dumps({"one_rank": one, "n_ranks": many, "efficiency": round(efficiency, 3)}))
        return
    launch(args.nproc, args.threads, args, overrides)


if __name__ == "__main__":
    main()
