"""Training throughput (tokens/s) and MFU of a config at a given world size, measured on
the same train_step that main.py runs; DDP weak scaling; and the memory each rank holds
under DDP and under FSDP (trainer.strategy).

usage:
  python minGPT-ddp/bench.py [options] [config=FILE] [key=value ...]

  python minGPT-ddp/bench.py config=minGPT-ddp/shakespeare_cpu_cfg.yaml    one process, all cores
  python minGPT-ddp/bench.py --nproc 2 --threads 1                          2 ranks (torchrun inside)
  python minGPT-ddp/bench.py --nproc 2 --threads 1 trainer.strategy=fsdp    2 ranks, sharded
  python minGPT-ddp/bench.py --weak-scaling --nproc 2 --threads 1           1 rank vs 2 ranks, same per-rank batch
  python minGPT-ddp/bench.py --memory 1,2,4 --threads 1 --iters 2 --warmup 1 --windows 1
                                                        DDP and FSDP on 1, 2 and 4 ranks: bytes per rank
  torchrun --standalone --nproc-per-node 8 minGPT-ddp/bench.py              8 GPUs

Weak scaling keeps the per-rank batch fixed, so N ranks do N times the work per step;
efficiency = tokens/s of N ranks / (N x tokens/s of 1 rank). 1.0 means communication
costs nothing. The 1-rank run is a plain process without DDP: the baseline to beat.

Every run also reports, for each rank, the bytes of its parameters, gradients and AdamW
state (what it holds of them: all under DDP, 1/N under FSDP) and its peak memory: the
peak resident set of the process on a CPU (everything: Python, PyTorch, data, model),
the peak of PyTorch's allocations on a GPU.
The config keys and their defaults are main.py's (see python minGPT-ddp/main.py --help).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import config
import ddp_setup
from char_dataset import CharData
from model import GPT
from trainer import Trainer, check_setup

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
    parser.add_argument("--memory", metavar="N,N,...", default=None,
                        help="run DDP and FSDP on each of these numbers of ranks and print bytes per rank")
    parser.add_argument("--log_file", default=None, help="append each run's result here as one JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by launch()
    args, overrides = parser.parse_known_args()
    if args.iters < args.windows or args.windows < 1 or args.warmup < 0 or args.nproc < 1:
        bad_flag("need --iters >= --windows >= 1, --warmup >= 0 and --nproc >= 1")
    if args.memory is not None:
        try:
            args.memory = [int(n) for n in args.memory.split(",")]
        except ValueError:
            args.memory = []
        if not args.memory or min(args.memory) < 1:
            bad_flag(f"--memory takes numbers of ranks, e.g. 1,2,4; not {args.memory!r}")
    return args, overrides


def bad_flag(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds: of a sharded tensor (DTensor), only this rank's piece."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # The peak resident set of this process: kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_step(trainer, it: int) -> dict:
    """One training step, with the bytes this rank holds counted while its gradients exist."""
    trainer.accumulate_gradients(it)
    params = list(trainer.raw_model.parameters())
    grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
    trainer.optimizer_step()
    return {"param_bytes": local_bytes(params), "grad_bytes": grad_bytes,
            "optimizer_bytes": local_bytes(trainer.local_optimizer_state())}


def measure(args, overrides):
    """Run in every rank: warm up, time --iters steps, print one result line on rank 0."""
    cfg, config_path, _ = config.load(overrides)
    data = CharData(cfg.data, cfg.model.block_size)
    rt = ddp_setup.start(timeout=timedelta(minutes=cfg.trainer.timeout_minutes))
    try:
        check_setup(cfg.trainer, rt)
        base_bytes = peak_memory_bytes(rt.device)  # before the model: Python, PyTorch, the data
        torch.manual_seed(cfg.trainer.seed)
        trainer = Trainer(cfg, GPT(cfg.model, len(data.vocab)), data, rt)
        memory = memory_step(trainer, 0)  # the first warmup step
        first = max(args.warmup, 1)
        for it in range(1, first):
            trainer.train_step(it)
        steps_per_window = args.iters // args.windows
        window_seconds = []
        for window in range(args.windows):
            synchronize(rt)
            start = time.perf_counter()
            for i in range(steps_per_window):
                loss = trainer.train_step(first + window * steps_per_window + i)
            loss.item()  # waits for the GPU
            synchronize(rt)  # the slowest rank sets the pace
            window_seconds.append(time.perf_counter() - start)
        tokens = steps_per_window * trainer.tokens_per_step
        best, median = tokens / min(window_seconds), tokens / statistics.median(window_seconds)
        peak_all_ranks = trainer.peak_flops * rt.world_size
        result = {
            "config": Path(config_path).name, "overrides": [o for o in overrides],
            "device": rt.device.type, "world_size": rt.world_size,
            "threads_per_rank": torch.get_num_threads() if rt.device.type == "cpu" else None,
            "params": trainer.raw_model.num_params(), "flops_per_token": trainer.raw_model.flops_per_token(),
            "tokens_per_step": trainer.tokens_per_step, "dtype": str(trainer.dtype).removeprefix("torch."),
            "compile": cfg.trainer.compile, "tokens_per_s": round(best, 1), "tokens_per_s_median": round(median, 1),
            "ms_per_step": round(1000 * min(window_seconds) / steps_per_window, 2),
            "mfu": round(best * trainer.raw_model.flops_per_token() / peak_all_ranks, 4),
            "peak_flops_per_rank": trainer.peak_flops, "peak_source": trainer.peak_source,
            "strategy": cfg.trainer.strategy,
        }
        memory.update(peak_bytes=peak_memory_bytes(rt.device), base_bytes=base_bytes,
                      peak_kind="max allocated" if rt.device.type == "cuda" else "peak resident set")
        result["per_rank"] = [json.loads(m) for m in ddp_setup.gather_strings(rt, json.dumps(memory))]
        threads = f" x {result['threads_per_rank']} thread(s)" if rt.device.type == "cpu" else ""
        rt.print(f"bench | {cfg.trainer.strategy} | {rt.world_size} rank(s){threads} | "
                 f"{result['tokens_per_step']:,} tokens/step | "
                 f"{best:,.0f} tok/s (median {median:,.0f}) | {best / rt.world_size:,.0f} tok/s per rank | "
                 f"{result['ms_per_step']:.1f} ms/step | mfu {100 * result['mfu']:.1f}% of {peak_all_ranks / 1e9:,.0f} "
                 f"GFLOP/s ({trainer.peak_source})")
        for rank, m in enumerate(result["per_rank"]):
            rt.print(f"memory | rank {rank} | params {mb(m['param_bytes'])} | grads {mb(m['grad_bytes'])} | "
                     f"AdamW state {mb(m['optimizer_bytes'])} | {m['peak_kind']} {mb(m['peak_bytes'])} "
                     f"({mb(m['base_bytes'])} before the model)")
        if rt.is_main:
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        time.sleep(0.1)  # let Gloo's thread finish first: a teardown meanwhile can deadlock (see main.py)
        return result
    finally:
        ddp_setup.stop(rt)


def mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def synchronize(rt):
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    if rt.distributed:
        dist.barrier()


def launch(nproc: int, threads, args, overrides, torchrun: bool = False) -> dict:
    """Start the measurement as a child: a plain process for 1 rank (unless torchrun), torchrun for more."""
    script = str(Path(__file__).resolve())
    worker_args = ["--worker", "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--windows", str(args.windows), *overrides]
    if nproc == 1 and not torchrun:
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
    # A PyTorch bug (README, troubleshooting) can abort a Gloo process at exit after it has printed its result.
    aborted_at_exit = "terminate called without an active exception" in proc.stderr
    if proc.returncode != 0 and results and aborted_at_exit:
        print(f"(the {nproc}-rank run aborted at exit after reporting, a PyTorch bug at exit; its result stands)")
    elif proc.returncode != 0 or not results:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines()
        raise SystemExit(f"error: the {nproc}-rank benchmark failed (exit {proc.returncode}): "
                         f"{errors[-1] if errors else 'no output'}")
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            print(line, flush=True)
    if args.log_file:
        with open(args.log_file, "a") as f:
            f.write(json.dumps(results[0]) + "\n")
    return results[0]


def memory_table(args, overrides):
    """DDP and FSDP on each world size of --memory, one torchrun each; a table of rank 0's bytes."""
    # glibc keeps large freed blocks for reuse unless told otherwise, and the resident set counts them as if
    # still in use: FSDP gathers and frees a block's weights again and again, so its peak would show the
    # high-water mark of glibc's cache. A fixed threshold makes every block of 128 KiB or more its own
    # mapping, returned to the system when freed: the peak then shows what was in use at once.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for nproc in args.memory:
        for strategy in ("ddp", "fsdp"):
            r = launch(nproc, args.threads, args, [*overrides, f"trainer.strategy={strategy}"], torchrun=True)
            rows.append((strategy, nproc, r["per_rank"][0]))
    print(f"rank 0 of each run; peak memory: {rows[0][2]['peak_kind']}")
    print("| strategy | ranks | parameters | gradients | AdamW state | peak memory | before the model |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for strategy, nproc, m in rows:
        print(f"| {strategy} | {nproc} | {mb(m['param_bytes'])} | {mb(m['grad_bytes'])} | "
              f"{mb(m['optimizer_bytes'])} | {mb(m['peak_bytes'])} | {mb(m['base_bytes'])} |")


def main():
    args, overrides = parse_args()
    if args.worker or "WORLD_SIZE" in os.environ:  # under torchrun, or started by launch()
        measure(args, overrides)
        return
    if args.memory:
        memory_table(args, overrides)
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
