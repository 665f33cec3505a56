"""Training throughput (tokens/s) and MFU of a config at a given world size, measured on
the same train_step that main.py runs; DDP weak scaling; what makes DDP fast (its levers, side
by side); and the memory each rank holds and the bytes it sends under each strategy.

usage:
  python minGPT-ddp/bench.py [options] [config=FILE] [key=value ...]

  python minGPT-ddp/bench.py config=minGPT-ddp/shakespeare_cpu_cfg.yaml   one process, all cores
  python minGPT-ddp/bench.py --nproc 2 --threads 1                         2 ranks (torchrun inside)
  python minGPT-ddp/bench.py --nproc 2 --threads 1 trainer.strategy=fsdp   2 ranks, sharded
  python minGPT-ddp/bench.py --weak-scaling --nproc 2                      1 rank vs 2, side by side
  python minGPT-ddp/bench.py --ddp-levers --nproc 2                        DDP's levers side by side
  python minGPT-ddp/bench.py --memory 1,2,4 --threads 1 --iters 2 --warmup 1 --windows 1
                                 ddp, zero1, fsdp-2, fsdp-3 on 1, 2 and 4 ranks: bytes per rank
  torchrun --standalone --nproc-per-node 8 minGPT-ddp/bench.py             8 GPUs

Weak scaling keeps the per-rank batch fixed, so N ranks do N times the work per step;
efficiency = tokens/s of N ranks / (N x tokens/s of 1 rank). 1.0 means communication
costs nothing. The 1 rank is a plain process without DDP (rank 0 training alone while the
others wait, in turns with the N ranks: the first two rows of --ddp-levers).

--ddp-levers times, in one process group of --nproc ranks, one model per setting: DDP as
configured, other bucket sizes, gradient_as_bucket_view and static_graph switched, a 16-bit
compression hook, the hand-made DDP (trainer.strategy=handmade), a no-op hook that sends nothing
(the ceiling), and rank 0 training alone without DDP (the weak-scaling baseline). Their windows
take turns, so every setting sees the same load on a shared machine: the ratios hold, where times
measured one after the other would not.

Every run also reports, for each rank, the bytes of its parameters, gradients and AdamW
state (what it holds of them: all under DDP, 1/N under FSDP), its peak memory (the peak
resident set of the process on a CPU: everything, Python, PyTorch, data, model; the peak
of PyTorch's allocations on a GPU), and the bytes it sends in one step (minGPT-ddp/traffic.py).
The config keys and their defaults are main.py's (see python minGPT-ddp/main.py --help).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import config
import ddp_setup
import traffic
from char_dataset import CharData
from model import GPT
from trainer import Trainer, check_setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import proc  # noqa: E402  (tools/proc.py: a time limit that also ends torchrun's workers)

RESULT_PREFIX = "BENCH_RESULT "  # the line a worker prints for the process that launched it
# --memory: the ZeRO ladder, from a whole copy per rank to everything sharded
LADDER = (("ddp", ["trainer.strategy=ddp"]), ("zero1", ["trainer.strategy=zero1"]),
          ("fsdp-2", ["trainer.strategy=fsdp", "trainer.reshard_after_forward=false"]),
          ("fsdp-3", ["trainer.strategy=fsdp", "trainer.reshard_after_forward=true"]))


def parse_args():
    parser = argparse.ArgumentParser(
        usage="python minGPT-ddp/bench.py [options] [config=FILE] [key=value ...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=5,
                        help="split the timed steps into this many windows and report the best and "
                             "the median: on a shared machine some windows lose the CPU to others "
                             "(default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks to start with torchrun (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per rank on CPU (default: as it is; 1 with "
                             "--weak-scaling and --ddp-levers)")
    parser.add_argument("--weak-scaling", action="store_true",
                        help="1 rank against --nproc ranks (2 if not given), same per-rank batch, "
                             "side by side")
    parser.add_argument("--ddp-levers", action="store_true",
                        help="time DDP's settings side by side on --nproc ranks (2 if not given)")
    parser.add_argument("--memory", metavar="N,N,...", default=None,
                        help="run ddp, zero1, fsdp-2 and fsdp-3 on each of these numbers of ranks "
                             "and print the bytes per rank")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds a benchmark run may take before it is stopped "
                             "(default: %(default)s)")
    parser.add_argument("--log_file", default=None,
                        help="append each run's result here as one JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by launch()
    args, overrides = parser.parse_known_args()
    if (args.iters < args.windows or args.windows < 1 or args.warmup < 0 or args.nproc < 1
            or args.timeout <= 0):
        bad_flag("need --iters >= --windows >= 1, --warmup >= 0, --nproc >= 1 and --timeout > 0")
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
    """Bytes of the tensors this rank holds: of a sharded tensor (DTensor), this rank's piece."""
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
    """One training step, with the bytes this rank holds counted while its gradients exist, and
    the bytes it sent."""
    with traffic.CollectiveCounter(trainer.rt.world_size) as sent:
        trainer.accumulate_gradients(it)
        params = list(trainer.raw_model.parameters())
        grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        trainer.optimizer_step()
    return {"param_bytes": local_bytes(params), "grad_bytes": grad_bytes,
            "optimizer_bytes": local_bytes(trainer.local_optimizer_state()),
            "sent_bytes": round(sent.bytes_sent), "collectives": dict(sent.counts)}


def build(cfg, data: CharData, rt: ddp_setup.Runtime) -> Trainer:
    torch.manual_seed(cfg.trainer.seed)
    trainer = Trainer(cfg, GPT(cfg.model, len(data.vocab)), data, rt)
    if rt.device.type == "cuda":  # the MFU probe's big matmuls (mfu.py) are not part of training
        torch.cuda.reset_peak_memory_stats(rt.device)
    return trainer


def timed_window(trainer, rt, first: int, steps: int) -> float:
    """Seconds for optimizer steps first .. first+steps-1, from when all of rt's ranks start."""
    synchronize(rt)
    start = time.perf_counter()
    for it in range(first, first + steps):
        loss = trainer.train_step(it)
    loss.item()  # waits for the GPU
    synchronize(rt)  # the slowest rank sets the pace
    return time.perf_counter() - start


def speed(trainer, window_seconds: list, steps_per_window: int) -> dict:
    tokens = steps_per_window * trainer.tokens_per_step
    return {"tokens_per_s": round(tokens / min(window_seconds), 1),
            "tokens_per_s_median": round(tokens / statistics.median(window_seconds), 1),
            "ms_per_step": round(1000 * min(window_seconds) / steps_per_window, 2)}


def measure(args, overrides):
    """Run in every rank: warm up, time --iters steps, print one result line on rank 0."""
    cfg, config_path, _ = config.load(overrides)
    data = CharData(cfg.data, cfg.model.block_size)
    rt = ddp_setup.start(timeout=timedelta(minutes=cfg.trainer.timeout_minutes))
    try:
        check_setup(cfg.trainer, rt)
        base_bytes = peak_memory_bytes(rt.device)  # before the model: Python, PyTorch, the data
        trainer = build(cfg, data, rt)
        memory = memory_step(trainer, 0)  # the first warmup step
        first = max(args.warmup, 1)
        for it in range(1, first):
            trainer.train_step(it)
        steps = args.iters // args.windows
        windows = [timed_window(trainer, rt, first + w * steps, steps) for w in range(args.windows)]
        model, tcfg = trainer.raw_model, cfg.trainer
        result = {"config": Path(config_path).name, "overrides": list(overrides),
                  "device": rt.device.type, "world_size": rt.world_size,
                  "threads_per_rank": torch.get_num_threads() if rt.device.type == "cpu" else None,
                  "params": model.num_params(), "flops_per_token": model.flops_per_token(),
                  "tokens_per_step": trainer.tokens_per_step,
                  "dtype": str(trainer.dtype).removeprefix("torch."), "compile": tcfg.compile,
                  **speed(trainer, windows, steps), "peak_flops_per_rank": trainer.peak_flops,
                  "peak_source": trainer.peak_source, "strategy": tcfg.strategy,
                  "reshard_after_forward": tcfg.reshard_after_forward}
        peak_all_ranks = trainer.peak_flops * rt.world_size
        result["mfu"] = round(result["tokens_per_s"] * model.flops_per_token() / peak_all_ranks, 4)
        memory.update(peak_bytes=peak_memory_bytes(rt.device), base_bytes=base_bytes,
                      peak_kind="max allocated" if rt.device.type == "cuda"
                      else "peak resident set")
        every_rank = ddp_setup.gather_strings(rt, json.dumps(memory))
        result["per_rank"] = [json.loads(m) for m in every_rank]
        threads = f" x {result['threads_per_rank']} thread(s)" if rt.device.type == "cpu" else ""
        rt.print(f"bench | {tcfg.strategy} | {rt.world_size} rank(s){threads} | "
                 f"{result['tokens_per_step']:,} tokens/step | {result['tokens_per_s']:,.0f} tok/s "
                 f"(median {result['tokens_per_s_median']:,.0f}) | "
                 f"{result['tokens_per_s'] / rt.world_size:,.0f} tok/s per rank | "
                 f"{result['ms_per_step']:.1f} ms/step | mfu {100 * result['mfu']:.1f}% of "
                 f"{peak_all_ranks / 1e9:,.0f} GFLOP/s ({trainer.peak_source})")
        for rank, m in enumerate(result["per_rank"]):
            rt.print(f"memory | rank {rank} | params {mb(m['param_bytes'])} | "
                     f"grads {mb(m['grad_bytes'])} | AdamW state {mb(m['optimizer_bytes'])} | "
                     f"{m['peak_kind']} {mb(m['peak_bytes'])} ({mb(m['base_bytes'])} before the "
                     f"model) | sends {mb(m['sent_bytes'])} per step")
        if rt.is_main:
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result
    finally:
        trainer = model = None  # they hold the process group: let go first (ddp_setup.stop)
        ddp_setup.stop(rt)


def no_all_reduce(state, bucket):
    """A DDP comm hook that sends nothing: each rank keeps its own gradients. Wrong training, but it
    times everything DDP does except the communication."""
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def levers(rt, cfg, weak_scaling_only: bool) -> list:
    """(label, config overrides or a special name, why) for each setting --ddp-levers times."""
    t = cfg.trainer
    hook = "bf16" if rt.backend in ("nccl", "xccl") else "fp16"  # PyTorch's bf16 hook needs NCCL
    weak_scaling = [
        ("1 rank alone, no DDP", "alone",
         "the baseline each of N ranks would match if sending were free"),
        (f"DDP as configured ({t.bucket_cap_mb:g} MB buckets)", [], "main.py's settings")]
    if weak_scaling_only:
        return weak_scaling
    return [
        *weak_scaling,
        *[(f"bucket_cap_mb={size:g}", [f"trainer.bucket_cap_mb={size:g}"],
           "smaller: the first all-reduce starts earlier, more of them" if size < t.bucket_cap_mb
           else "larger: fewer, later all-reduces")
          for size in (0.25, 1, 4, 100) if size != t.bucket_cap_mb],
        (f"gradient_as_bucket_view={str(not t.gradient_as_bucket_view).lower()}",
         [f"trainer.gradient_as_bucket_view={not t.gradient_as_bucket_view}"],
         "whether .grad is DDP's bucket (no copy in and out)"),
        (f"static_graph={str(not t.static_graph).lower()}",
         [f"trainer.static_graph={not t.static_graph}"],
         "whether DDP may assume the same graph every step"),
        (f"comm_hook={hook}", [f"trainer.comm_hook={hook}"], "half the bytes; changes the result"),
        ("strategy=handmade", ["trainer.strategy=handmade"],
         "handmade.py: hooks, buckets, async all-reduce"),
        ("no all-reduce (a no-op hook)", "no-op", "the ceiling: DDP without its communication"),
    ]


def measure_levers(args, overrides):
    """--ddp-levers in every rank: one model per setting, their timed windows in turn."""
    cfg, config_path, _ = config.load(overrides)
    data = CharData(cfg.data, cfg.model.block_size)
    rt = ddp_setup.start(timeout=timedelta(minutes=cfg.trainer.timeout_minutes))
    try:
        check_setup(cfg.trainer, rt)
        if not rt.distributed or cfg.trainer.strategy != "ddp":
            raise SystemExit("error: --ddp-levers and --weak-scaling time DDP on 2 or more ranks "
                             "with trainer.strategy=ddp")
        alone = ddp_setup.Runtime(0, 0, 1, rt.device, None)  # rank 0 as one plain process
        runs = []
        for label, setting, why in levers(rt, cfg, args.weak_scaling):
            extra = setting if isinstance(setting, list) else []
            variant, _, _ = config.load([*overrides, *extra])
            group = alone if setting == "alone" else rt
            trainer = build(variant, data, group) if rt.is_main or group is rt else None
            if setting == "no-op":
                trainer.ddp_model.register_comm_hook(None, no_all_reduce)
            runs.append({"label": label, "why": why, "trainer": trainer, "group": group,
                         "seconds": []})
        steps = args.iters // args.windows
        for window in range(-1, args.windows):  # window -1: the warm-up, untimed
            for r in runs:
                n, first = (args.warmup, 0) if window < 0 else (steps, args.warmup + window * steps)
                if r["trainer"] is not None and n > 0:
                    seconds = timed_window(r["trainer"], r["group"], first, n)
                    if window >= 0:
                        r["seconds"].append(seconds)
                synchronize(rt)  # rank 0 alone: the others wait here for it
        if rt.is_main:
            rows = [{"label": r["label"], "why": r["why"],
                     "tokens_per_step": r["trainer"].tokens_per_step,
                     **speed(r["trainer"], r["seconds"], steps)} for r in runs]
            for row in rows:  # scaling efficiency: against N x rank 0 alone, in the same turns
                n = 1 if row is rows[0] else rt.world_size
                for key in ("tokens_per_s", "tokens_per_s_median"):
                    efficiency = row[key] / (n * rows[0][key])
                    row[key.replace("tokens_per_s", "efficiency")] = round(efficiency, 3)
            print(RESULT_PREFIX + json.dumps({
                "config": Path(config_path).name, "overrides": list(overrides),
                "device": rt.device.type, "backend": rt.backend, "world_size": rt.world_size,
                "threads_per_rank": torch.get_num_threads() if rt.device.type == "cpu" else None,
                "params": runs[1]["trainer"].raw_model.num_params(), "levers": rows}), flush=True)
    finally:
        runs = r = None  # the models hold the process group: let go of them first (ddp_setup.stop)
        ddp_setup.stop(rt)


def mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def synchronize(rt):
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    if rt.distributed:
        dist.barrier()


def launch(nproc: int, threads, args, overrides, torchrun: bool = False, mode: tuple = ()) -> dict:
    """Start the measurement as a child: a plain process for 1 rank (unless torchrun), torchrun
    for more."""
    script = str(Path(__file__).resolve())
    worker_args = ["--worker", *mode, "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--windows", str(args.windows), *overrides]
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), script, *worker_args]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = proc.run(cmd, env=env, timeout=args.timeout)
    if done.timed_out:
        raise SystemExit(f"error: the {nproc}-rank benchmark took more than --timeout "
                         f"{args.timeout:g} s; stopped")
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        errors = ([line for line in done.stderr.splitlines() if "error" in line.lower()]
                  or done.stderr.splitlines())
        raise SystemExit(f"error: the {nproc}-rank benchmark failed (exit {done.returncode}): "
                         f"{errors[-1] if errors else 'no output'}")
    for line in done.stdout.splitlines():
        if line.startswith("["):
            print(line, flush=True)
    if args.log_file:
        with open(args.log_file, "a") as f:
            f.write(json.dumps(results[0]) + "\n")
    return results[0]


def memory_table(args, overrides):
    """The ZeRO ladder on each world size of --memory, one torchrun each; rank 0's bytes."""
    # glibc keeps large freed blocks for reuse unless told otherwise, and the resident set counts
    # them as if still in use: FSDP gathers and frees a block's weights again and again, so its peak
    # would show the high-water mark of glibc's cache. A fixed threshold makes every block of
    # 128 KiB or more its own mapping, returned to the system when freed: the peak then shows what
    # was in use at once.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for nproc in args.memory:
        for name, setting in LADDER:
            r = launch(nproc, args.threads, args, [*overrides, *setting], torchrun=True)
            rows.append((name, nproc, r["per_rank"][0]))
    print(f"rank 0 of each run; peak memory: {rows[0][2]['peak_kind']}; sent: the bytes of one "
          "step's collectives with ring algorithms")
    print("| strategy | ranks | parameters | gradients | AdamW state | peak memory "
          "| above the start | sent per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, nproc, m in rows:
        print(f"| {name} | {nproc} | {mb(m['param_bytes'])} | {mb(m['grad_bytes'])} | "
              f"{mb(m['optimizer_bytes'])} | {mb(m['peak_bytes'])} | "
              f"{mb(m['peak_bytes'] - m['base_bytes'])} | {mb(m['sent_bytes'])} |")


def levers_table(args, overrides):
    """--ddp-levers, or --weak-scaling (its first two rows): one torchrun, a table, JSON."""
    nproc = args.nproc if args.nproc > 1 else 2
    threads = args.threads or 1
    mode = ("--ddp-levers", *(["--weak-scaling"] if args.weak_scaling else []))
    r = launch(nproc, threads, args, overrides, torchrun=True, mode=mode)
    print(f"{'weak scaling' if args.weak_scaling else 'DDP levers'} | {r['config']} "
          f"({r['params'] / 1e6:.2f}M parameters) | {r['device']}, {r['backend']} | {nproc} ranks "
          f"x {threads} thread(s) | windows in turn: every row saw the same load")
    print("| setting | tokens/s, best window | median | scaling efficiency, best (median) | why |")
    print("| --- | --- | --- | --- | --- |")
    for row in r["levers"]:
        print(f"| {row['label']} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s_median']:,.0f} "
              f"| {row['efficiency']:.2f} ({row['efficiency_median']:.2f}) | {row['why']} |")
    print(RESULT_PREFIX + json.dumps(r), flush=True)
    return r


def main():
    args, overrides = parse_args()
    if args.worker or "WORLD_SIZE" in os.environ:  # under torchrun, or started by launch()
        (measure_levers if args.ddp_levers else measure)(args, overrides)
        return
    if args.memory:
        memory_table(args, overrides)
        return
    if args.ddp_levers or args.weak_scaling:
        levers_table(args, overrides)
        return
    launch(args.nproc, args.threads, args, overrides)


if __name__ == "__main__":
    main()
