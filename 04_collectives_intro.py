"""Step 04: open DDP's box. The collectives underneath it, one small demo each.

Steps 02-03 let DDP do the communication. Here every process holds a tiny tensor and calls one
primitive of torch.distributed; rank 0 prints every rank's tensor before and after, in rank
order, so that what the primitive does can be read off the output. No Trainer, no data set: a
side lab, started with mp.spawn as in step 02 (or with torchrun).

The teacher's path is the default run (10-15 minutes on a projector; read each table aloud):
  1. send_recv          one message between two processes; the receiver provides the buffer.
  2. broadcast          rank 0's tensor to everyone: DDP's constructor does this with the weights.
  3. all_reduce         SUM and MAX, every rank gets the result: DDP runs it on the gradients.
  4. all_gather         every rank gets every rank's tensor, in rank order.
  5. reduce_scatter     rank i gets the sum of everyone's piece i: an all_reduce left split.
  6. all_to_all_single  rank i sends its piece j to rank j: a transpose across ranks.
  7. ring_all_reduce    all_reduce by hand from send/recv: reduce-scatter, then all-gather.
  8. manual_ddp         average the gradients by hand after backward(): the weights of DDP.
More with --demo NAME (repeatable, or a comma list; --demo all runs all 11): barrier, new_group
(a collective within a subgroup; try 4 processes) and ring_bandwidth (the hand-made ring timed
next to dist.all_reduce).

    python 04_collectives_intro.py                    # one process per GPU, or 2 CPU processes
    python 04_collectives_intro.py --world_size 4 --demo new_group,barrier
    torchrun --standalone --nproc-per-node 3 04_collectives_intro.py --demo all
"""
import argparse
import copy
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group: see main()'s end
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

BACKENDS = {"cuda": "nccl", "xpu": "xccl"}  # how NVIDIA or Intel GPUs talk; CPUs use Gloo
# The cores this process may run on: fewer than the machine has under taskset, Slurm, a container
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plan_devices(processes: int, gpus: int, force_cpu: bool, gpu_type: str = "cuda"):
    """(device type, backend, why): GPUs if this node has one per process, else the CPU, Gloo."""
    if force_cpu or gpus < processes:
        gpus_here = f"{gpus or 'no'} GPU{'s' * (gpus > 1)}"
        why = "--cpu" if force_cpu else f"{gpus_here} for {processes} processes"
        return "cpu", "gloo", f"({why}: using the CPU)"
    return gpu_type, BACKENDS[gpu_type], "(one GPU per process)"


def setup(args):
    """torchrun (or spawn below) has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    has_gpus = accelerator is not None and accelerator.type in BACKENDS
    gpus = torch.accelerator.device_count() if has_gpus else 0
    processes_here = int(os.environ["LOCAL_WORLD_SIZE"])
    device_type, backend, why = plan_devices(processes_here, gpus, args.cpu,
                                             accelerator.type if gpus else "cuda")
    if device_type == "cpu":
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # yours wins; else share this node's cores out
            torch.set_num_threads(max(1, USABLE_CORES // processes_here))
    else:
        device = torch.device(device_type, int(os.environ["LOCAL_RANK"]))
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    # The timeout: a dead peer ends in an error, not a hang
    dist.init_process_group(backend, timeout=timedelta(minutes=args.timeout_min))
    return device, backend, why


def labelled(device, length):
    """Rank r's tensor 10(r+1) + [0, 1, ...]: the tens say whose it is (rank 1: 20, 21, ...)."""
    return 10 * (dist.get_rank() + 1) + torch.arange(length, dtype=torch.float32, device=device)


# ---- How the tables are printed. show() is itself a collective (all_gather_object): every rank
# ---- must call it, or the others wait for the missing one. Rank 0 prints and logs. -------------
OUTPUT = {"tag": "", "log_file": None}  # set by main()


def collect(t):
    """Every rank's values of `t` (a tensor, a list of tensors, or None: nothing), in rank order,
    on every rank."""
    if isinstance(t, (list, tuple)):
        t = torch.cat([x.flatten() for x in t])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [] if t is None else t.detach().flatten().cpu().tolist())
    return everyone


def fmt(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def say(text):
    if dist.get_rank() == 0:
        print(f"{OUTPUT['tag']} {text}")


def log(record):
    if dist.get_rank() == 0 and OUTPUT["log_file"]:
        with open(OUTPUT["log_file"], "a") as f:
            f.write(json.dumps(record) + "\n")


def show(demo, headline, before, after, note=None, **extra):
    """Rank 0 prints and logs every rank's `before` and `after`; every rank calls it."""
    before, after = collect(before), collect(after)
    say(f"--- {headline}")
    for r in range(dist.get_world_size()):
        say(f"    rank {r}: before {fmt(before[r])}  after {fmt(after[r])}")
    if note:
        say(f"    {note}")
    log({"demo": demo, "world_size": dist.get_world_size(), "before": before, "after": after,
         **extra})


def show_ring_step(phase, step, t):  # every rank calls it, as show()
    everyone, label = collect(t), f"{phase} step {step}" if step else phase
    say(f"    {label}: " + "  ".join(f"rank {i} {fmt(v)}" for i, v in enumerate(everyone)))
    if step:  # the start is logged as the demo's "before"
        log({"demo": "ring_all_reduce", "world_size": len(everyone), "phase": phase, "step": step,
             "state": everyone})


# ---- point to point ------------------------------------------------------------------------------
def send_recv(device, args):
    # Blocking: send() returns once the data is handed over, recv() once it has arrived, into a
    # buffer the receiver made, of the same shape and dtype.
    rank = dist.get_rank()
    t = torch.tensor([1.0, 2, 3, 4], device=device) if rank == 0 else torch.zeros(4, device=device)
    before = t.clone()
    if rank == 0:
        dist.send(t, dst=1)
    elif rank == 1:
        dist.recv(t, src=0)
    show("send_recv", "send_recv: rank 0 send(dst=1), rank 1 recv(src=0); the other ranks take no "
         "part", before, t)


# ---- collectives: every rank of the group calls them, in the same order -------------------------
def broadcast(device, args):
    t = labelled(device, 4)
    before = t.clone()
    dist.broadcast(t, src=0)  # in place: every rank's t becomes rank 0's t
    show("broadcast", "broadcast(src=0): every rank gets rank 0's tensor", before, t)


def all_reduce(device, args):
    # DDP averages gradients with it: a SUM, divided by world_size (ReduceOp.AVG does both; Gloo
    # has it since PyTorch 2.8).
    r, n = dist.get_rank(), dist.get_world_size()
    for op in ("SUM", "MAX"):
        t = torch.tensor([r + 1, n - r, 10 * (r + 1), 10 * (n - r)], dtype=torch.float32,
                         device=device)
        before = t.clone()
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        show("all_reduce", f"all_reduce(op={op}): every rank gets the element-wise {op}", before, t,
             op=op)


def all_gather(device, args):
    t = labelled(device, 2)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    show("all_gather", "all_gather: every rank gets every rank's tensor, in rank order", t, out)


def reduce_scatter_by_all_reduce(pieces):
    """reduce_scatter where the backend lacks it (Gloo before PyTorch 2.8): all_reduce every
    piece, keep your own (twice the traffic)."""
    everything = torch.cat(pieces)
    dist.all_reduce(everything)
    return everything.chunk(dist.get_world_size())[dist.get_rank()]


def reduce_scatter(device, args):
    # Every rank holds world_size pieces; rank i ends with the sum over ranks of piece i. NCCL does
    # it as the first half of a ring all-reduce (see ring_all_reduce); Gloo, piece by piece.
    n, r = dist.get_world_size(), dist.get_rank()
    pieces = list(((r + 1) * torch.arange(1.0, 2 * n + 1, device=device)).chunk(n))  # of 2 values
    out, method = torch.zeros(2, device=device), "native"
    try:
        dist.reduce_scatter(out, pieces, op=dist.ReduceOp.SUM)
    except RuntimeError:
        out, method = reduce_scatter_by_all_reduce(pieces), "fallback: all_reduce, keep own piece"
    show("reduce_scatter", "reduce_scatter(op=SUM): rank i gets the sum over ranks of everyone's "
         "piece i", pieces, out, note=None if method == "native" else method, method=method)


def all_to_all_single(device, args):
    # Piece j of rank i goes to rank j, where it lands as piece i: rows become columns. Mixture-
    # of-experts layers send tokens to their experts this way (all_to_all: the same with lists).
    t = labelled(device, dist.get_world_size())  # piece j: one value, meant for rank j
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t)
    show("all_to_all_single", "all_to_all_single: rank i sends its piece j to rank j (a transpose)",
         t, out)


def barrier(device, args):
    # Rank r arrives r * 0.2 s late; nobody leaves the barrier before the last one has arrived.
    dist.barrier()
    time.sleep(0.2 * dist.get_rank())
    start = time.perf_counter()
    dist.barrier()
    show("barrier", "barrier: rank r arrives r*0.2 s late; before = arrival delay (s), after = "
         "time waited (s)", torch.tensor([0.2 * dist.get_rank()]),
         torch.tensor([round(time.perf_counter() - start, 3)]))


def new_group(device, args):
    # Every rank calls new_group for every group, even one it is not in, in the same order.
    n, r = dist.get_world_size(), dist.get_rank()
    evens, odds = dist.new_group(list(range(0, n, 2))), dist.new_group(list(range(1, n, 2)))
    t = torch.tensor([r + 1.0], device=device)
    before = t.clone()
    dist.all_reduce(t, group=odds if r % 2 else evens)  # only that group's ranks take part
    few = "with fewer than 4 processes a group has one member: try --world_size 4"
    show("new_group", "new_group: even ranks [0, 2, ...] and odd ranks [1, 3, ...]; "
         "all_reduce(SUM) within each", before, t, note=few if n < 4 else None)


# ---- a ring all-reduce from send/recv ------------------------------------------------------------
def ring_exchange(send, recv):
    """Send `send` to the right neighbour while receiving `recv` from the left, both at once."""
    rank, n = dist.get_rank(), dist.get_world_size()
    # A tensor shorter than world_size has empty chunks: nothing to send or receive for those.
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % n)] if send.numel() else []
    ops += [dist.P2POp(dist.irecv, recv, (rank - 1) % n)] if recv.numel() else []
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()


def ring_all_reduce_by_hand(t, on_step=lambda phase, step, t: None):
    """Sum `t` over all ranks in place, as one of NCCL's and Gloo's algorithms for large tensors
    does. Cut t into world_size chunks (of any lengths: they need not be equal).
    1. reduce-scatter, world_size-1 steps: at step s rank r sends chunk (r-s) to the right and
       adds the chunk (r-s-1) it receives from the left. Then rank r holds the sum of chunk r+1.
    2. all-gather, world_size-1 steps: pass the finished chunks around the ring, overwriting.
    Each rank sends 2*(world_size-1)/world_size of the tensor, whatever the world size: the ring
    is bandwidth-optimal.
    """
    n, r = dist.get_world_size(), dist.get_rank()
    chunks = list(t.tensor_split(n))  # views into t: writing a chunk writes t
    for step in range(n - 1):
        incoming = torch.empty_like(chunks[(r - step - 1) % n])
        ring_exchange(chunks[(r - step) % n], incoming)
        chunks[(r - step - 1) % n] += incoming
        on_step("reduce_scatter", step + 1, t)
    for step in range(n - 1):
        ring_exchange(chunks[(r + 1 - step) % n], chunks[(r - step) % n])
        on_step("all_gather", step + 1, t)
    return t


def ring_all_reduce(device, args):
    n, r = dist.get_world_size(), dist.get_rank()
    t = (r + 1) * torch.arange(1.0, 2 * n + 2, device=device)  # 2n+1 values: unequal chunks
    before = t.clone()
    say(f"--- ring_all_reduce: by hand from send/recv; {len(t)} values in {n} chunks, {n - 1} "
        f"reduce-scatter step(s) then {n - 1} all-gather step(s)")
    show_ring_step("start", 0, t)
    ring_all_reduce_by_hand(t, on_step=show_ring_step)
    expected = before.clone()
    dist.all_reduce(expected)
    # And 65537 random numbers (a prime: unequal chunks): dist.all_reduce's sums, up to rounding.
    x = torch.randn(65537, generator=torch.Generator().manual_seed(100 + r)).to(device)
    reference = x.clone()
    dist.all_reduce(reference)
    worst = (ring_all_reduce_by_hand(x) - reference).abs().max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    exact = bool(torch.equal(t, expected))
    show("ring_all_reduce", "ring_all_reduce: before = each rank's tensor, after = the ring's "
         "result", before, t, note=f"equals dist.all_reduce: exactly {exact}; on 65537 random "
         f"numbers, max difference {worst.item():.1e}", max_abs_diff=worst.item(),
         random_size=65537, matches_all_reduce=exact and worst.item() < 1e-4)  # for the notebook


def ring_bandwidth(device, args):
    # The same bytes through the hand-made ring and through dist.all_reduce (C++, no Python).
    n = dist.get_world_size()
    x = torch.randn(max(n, int(args.bench_mb * 2**20) // 4), device=device)
    sync = torch.accelerator.synchronize if device.type != "cpu" else lambda: None  # GPUs: async
    record = {"demo": "ring_bandwidth", "world_size": n, "bytes": x.numel() * 4,
              "iterations": args.bench_iters}
    for name, fn in (("ring", ring_all_reduce_by_hand), ("all_reduce", dist.all_reduce)):
        fn(x)  # warm-up: connections are made on first use
        sync()
        start = time.perf_counter()
        for _ in range(args.bench_iters):
            fn(x)
        sync()
        seconds = torch.tensor((time.perf_counter() - start) / args.bench_iters, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        record[f"{name}_s"] = seconds.item()
        # "bus bandwidth" as nccl-tests define it: the bytes each rank moves over its link per
        # second, in a ring
        record[f"{name}_busbw_GBps"] = record["bytes"] * 2 * (n - 1) / n / seconds.item() / 1e9
    say(f"--- ring_bandwidth: {record['bytes'] / 2**20:.1f} MiB float32, {args.bench_iters} "
        f"iterations: ring by hand {record['ring_s'] * 1e3:.2f} ms "
        f"({record['ring_busbw_GBps']:.2f} GB/s bus bandwidth) | dist.all_reduce "
        f"{record['all_reduce_s'] * 1e3:.2f} ms ({record['all_reduce_busbw_GBps']:.2f} GB/s)")
    log(record)


# ---- data parallelism by hand --------------------------------------------------------------------
def manual_ddp(device, args):
    """What DDP does, written out: the same start, different data on every rank, gradients
    averaged."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(  # the small dense network of steps 01-03: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
    ddp_model = DDP(copy.deepcopy(model))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ddp_model)]
    before = model[0].weight.flatten()[:4].clone()
    g = torch.Generator().manual_seed(1000 + dist.get_rank())  # every rank its own batches
    for _ in range(args.manual_steps):
        x = torch.randn(16, 20, generator=g).to(device)
        for m, opt in zip((model, ddp_model), opts):
            opt.zero_grad()
            F.mse_loss(m(x), x.sum(dim=1, keepdim=True)).backward()
            if m is model:  # the whole trick; DDP does it in buckets, overlapped with backward()
                for p in model.parameters():
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad /= dist.get_world_size()
            opt.step()
    pairs = zip(model.parameters(), ddp_model.module.parameters())
    worst = max((a - b).abs().max() for a, b in pairs).detach()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ddp_after = collect(ddp_model.module[0].weight.flatten()[:4])
    show("manual_ddp", f"manual_ddp: first 4 weights; {args.manual_steps} SGD steps, each rank on "
         f"its own batches, gradients averaged with all_reduce", before,
         model[0].weight.flatten()[:4], note=f"DDP-wrapped copy: rank 0 {fmt(ddp_after[0])}; max "
         f"|manual - DDP| over all weights and ranks: {worst.item():.2e}",
         steps=args.manual_steps, ddp_after=ddp_after, max_abs_diff=worst.item())


DEMOS = {f.__name__: f for f in (send_recv, broadcast, all_reduce, all_gather, reduce_scatter,
                                 all_to_all_single, barrier, new_group, ring_all_reduce,
                                 ring_bandwidth, manual_ddp)}  # --demo all
CORE = ["send_recv", "broadcast", "all_reduce", "all_gather", "reduce_scatter",
        "all_to_all_single", "ring_all_reduce", "manual_ddp"]  # the teacher's path: the default


def main(args):
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # one write per whole line
    device, backend, why = setup(args)
    OUTPUT.update(tag=f"[{device} rank {dist.get_rank()}]", log_file=args.log_file)
    say(f"device {device.type} | backend {backend} | world_size {dist.get_world_size()} | {why}")
    for name in args.demo:
        DEMOS[name](device, args)
    left = len(DEMOS) - len(args.demo)
    say(f"Done: {len(args.demo)} of {len(DEMOS)} demos on world_size {dist.get_world_size()}"
        + (f" (the other {left}: --demo all, or --demo NAME)" if left else ""))
    dist.barrier()  # every rank leaves together
    # Nothing else may hold the group now (manual_ddp's DDP model is gone; torch.distributed.nn,
    # imported before init, does not pin it), so destroying it ends Gloo's threads: one still
    # running at Python's exit can abort a finished run (TROUBLESHOOTING.md, "Aborted at exit").
    dist.destroy_process_group()


def spawn_main(local_rank: int, world_size: int, args):
    """mp.spawn's entry: set the variables torchrun sets (one node), then run main()."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    main(args)


def spawn(args):
    """Plain python: start world_size processes on this machine, as step 02 does."""
    # Where rank 0 listens (yours, if you set these variables); the processes inherit them.
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "12355")
    mp.spawn(spawn_main, args=(args.world_size, args), nprocs=args.world_size)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 04: one demo per torch.distributed "
                                     "primitive, a ring all-reduce by hand, and gradient averaging "
                                     "by hand checked against DDP.")
    parser.add_argument("--demo", action="append", metavar="NAME",
                        help=f"demos to run, in this order (repeatable or a comma list; 'all': "
                        f"every one): {', '.join(DEMOS)} (default: {', '.join(CORE)})")
    parser.add_argument("--world_size", type=int, default=max(2, torch.accelerator.device_count()),
                        help="processes without torchrun (default: one per GPU if 2 or more, "
                        "else 2)")
    parser.add_argument("--cpu", action="store_true", help="the CPU and Gloo, even with GPUs")
    parser.add_argument("--bench_mb", type=float, default=8.0,
                        help="MiB of float32 for ring_bandwidth (default: 8)")
    parser.add_argument("--bench_iters", type=int, default=5,
                        help="timed iterations in ring_bandwidth (default: 5)")
    parser.add_argument("--manual_steps", type=int, default=5,
                        help="SGD steps in manual_ddp (default: 5)")
    parser.add_argument("--log_file", default=None,
                        help="rank 0 appends every table (and ring step) here as a JSON line: one "
                        "list of values per rank, empty where a rank has none (for the notebook)")
    parser.add_argument("--timeout_min", type=float, default=10,
                        help="minutes to wait for a slow or dead rank (default: 10)")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards: argument checks, one line each. Not the lesson: read them last. ---------------------
def check_args(parser, args):
    names = [name for value in args.demo or CORE for name in value.split(",") if name]
    for name in names:
        if name not in DEMOS and name != "all":
            parser.error(f"--demo: unknown demo {name!r}; choose from all, {', '.join(DEMOS)}")
    # each once, in the order given
    args.demo = list(DEMOS) if "all" in names else list(dict.fromkeys(names))
    for name in ("bench_mb", "bench_iters", "manual_steps", "timeout_min"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    torchrun = "LOCAL_RANK" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.world_size
    if world_size < 2:
        parser.error(f"world size {world_size}: every demo passes data between processes; start "
                     "at least 2")
    return args


if __name__ == "__main__":
    args = parse_args()
    if "LOCAL_RANK" in os.environ:  # torchrun started us: one process of many
        main(args)
    else:  # plain python
        spawn(args)
