"""Step 04: the collectives underneath DDP, one small demo each.

Steps 02-03 let DDP do the communication. This step opens the box: every process
holds a small tensor, calls one primitive of torch.distributed, and rank 0 prints
every rank's tensor before and after, in rank order, so the semantics can be read
off the output. Then it builds a ring all-reduce by hand from send/recv and averages
gradients by hand, and checks both against what PyTorch does.

New over step 03:
  * point to point: `send`/`recv` (blocking) and `isend`/`irecv` (non-blocking).
  * collectives: `broadcast`, `reduce`, `all_reduce` (SUM, AVG, MAX), `all_gather`,
    `gather`, `scatter`, `reduce_scatter`, `barrier`, and a subgroup made with `new_group`.
  * a ring all-reduce from send/recv (reduce-scatter, then all-gather), checked against
    `dist.all_reduce` and timed next to it.
  * manual data parallelism: `all_reduce` the gradients after `backward()`; the weights
    match a DDP-wrapped copy.

It starts either way (both set the same environment variables):

    torchrun --standalone --nproc-per-node 2 04_collectives_intro.py
    python 04_collectives_intro.py --world_size 3             # mp.spawn, as in step 02
    python 04_collectives_intro.py --world_size 4 --demo new_group

--log_file PATH: rank 0 appends one JSON line per demo,
    {"demo": NAME, "world_size": N, "before": [rank 0's values, rank 1's, ...], "after": [...]}
(an empty list where a rank passes in or gets back nothing, e.g. `gather` on ranks other than
the destination), one line per ring step for a small tensor,
    {"demo": "ring_all_reduce", "phase": "reduce_scatter" | "all_gather", "step": k, "state": [...]}
and the timing {"demo": "ring_bandwidth", ...}.
"""
import argparse
import copy
import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# Which communication library a device type uses: NCCL between NVIDIA GPUs
# (XCCL between Intel GPUs); Gloo between CPU processes.
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}
# How long a collective may wait for its peers: a dead peer becomes an error, not a hang.
TIMEOUT = timedelta(minutes=2)
# Not every backend implements every operation (older Gloo builds lack AVG and reduce_scatter).
UNSUPPORTED = (RuntimeError, NotImplementedError, ValueError)


def pick_device(local_rank: int):
    """Process `local_rank` gets this node's GPU number `local_rank` and NCCL; without GPUs every process
    uses the CPU and Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type in BACKENDS:
        gpus = torch.accelerator.device_count()
        if local_rank >= gpus:
            raise SystemExit(f"error: LOCAL_RANK {local_rank} has no GPU: this node has {gpus}; "
                             f"start at most {gpus} processes per node (--nproc-per-node {gpus})")
        return torch.device(accelerator.type, local_rank), BACKENDS[accelerator.type]
    return torch.device("cpu"), "gloo"


def ddp_setup(device: torch.device, backend: str):
    """torchrun (or spawn_main below) has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    if device.type == "cpu":
        # N processes sharing the CPU must not each start one thread per core. torchrun sets
        # OMP_NUM_THREADS=1 when it starts several; an OMP_NUM_THREADS you set yourself wins.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    else:
        torch.accelerator.set_device_index(device.index)
    dist.init_process_group(backend, timeout=TIMEOUT)


class Demos:
    """One method per demo. Every rank runs every method; only rank 0 prints and logs."""

    def __init__(self, device, log_file, bench_mb, bench_iters, manual_steps):
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.tag = f"[{device.type}:{self.rank}]"  # every line says which process it comes from
        self.log_file = log_file
        self.bench_mb = bench_mb
        self.bench_iters = bench_iters
        self.manual_steps = manual_steps

    # ---- helpers: show every rank's tensor on rank 0 ------------------------------------------
    def tensor(self, values):
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def collect(self, t):
        """Every rank's values, in rank order, on every rank (only for printing: not part of the lesson).
        `t` may be None (nothing to show on this rank); a list of tensors is shown joined."""
        if isinstance(t, (list, tuple)):
            t = torch.cat([x.flatten() for x in t])
        values = [] if t is None else t.detach().flatten().cpu().tolist()
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, values)
        return everyone

    def say(self, text):
        if self.rank == 0:
            print(f"{self.tag} {text}")

    def log(self, record):
        if self.rank == 0 and self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def report(self, name, headline, before, after, note=None, **extra):
        """Print a demo's before/after table on rank 0 and log it. `before`/`after` are this rank's
        tensors (or None); every rank must call this, since it collects from all of them."""
        before, after = self.collect(before), self.collect(after)
        self.say(f"--- {headline}")
        for r in range(self.world_size):
            self.say(f"    rank {r}: before {fmt(before[r])}  after {fmt(after[r])}")
        if note:
            self.say(f"    {note}")
        self.log({"demo": name, "world_size": self.world_size, "before": before, "after": after,
                  **extra})

    # ---- point to point ----------------------------------------------------------------------
    def send_recv(self):
        # Blocking: send() returns once the data is handed over, recv() once it has arrived.
        # Both sides must agree on shape and dtype; the receiver provides the buffer.
        t = self.tensor([1, 2, 3, 4]) if self.rank == 0 else torch.zeros(4, device=self.device)
        before = t.clone()
        if self.rank == 0:
            dist.send(t, dst=1)
        elif self.rank == 1:
            dist.recv(t, src=0)
        self.report("send_recv", "send_recv: rank 0 send(dst=1), rank 1 recv(src=0); the other ranks take no part",
                    before, t)

    def isend_irecv(self):
        # Non-blocking: isend/irecv return a request at once; wait() before touching the buffers.
        # Every rank sends to its right neighbour and receives from its left one at the same time.
        # With blocking calls that ring would need a careful order to avoid a deadlock.
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        send_buf = 10 * (self.rank + 1) + torch.arange(3, dtype=torch.float32, device=self.device)
        recv_buf = torch.zeros(3, device=self.device)
        # Even ranks send first, odd ranks receive first: every pair of calls between two ranks then
        # starts in matching order, which NCCL needs when both neighbours are the same rank.
        if self.rank % 2 == 0:
            requests = [dist.isend(send_buf, dst=right), dist.irecv(recv_buf, src=left)]
        else:
            requests = [dist.irecv(recv_buf, src=left), dist.isend(send_buf, dst=right)]
        for request in requests:
            request.wait()
        self.report("isend_irecv", "isend_irecv: isend to rank+1, irecv from rank-1 (a ring shift); "
                    "before = sent, after = received", send_buf, recv_buf)

    # ---- collectives: every rank of the group must call them, in the same order -----------------
    def broadcast(self):
        t = 10 * (self.rank + 1) + torch.arange(4, dtype=torch.float32, device=self.device)
        before = t.clone()
        dist.broadcast(t, src=0)  # in place: everyone's t becomes rank 0's t
        self.report("broadcast", "broadcast(src=0): every rank gets rank 0's tensor", before, t)

    def inputs_for_reduce(self):
        r, n = self.rank, self.world_size
        return self.tensor([r + 1, n - r, 10 * (r + 1), 10 * (n - r)])

    def reduce(self):
        t = self.inputs_for_reduce()
        before = t.clone()
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        # Only the destination's buffer is defined afterwards; the others may hold partial sums.
        self.report("reduce", "reduce(dst=0, op=SUM): rank 0 gets the element-wise sum", before,
                    t if self.rank == 0 else None, note="after is shown for rank 0 only: other ranks' "
                    "buffers hold no defined result")

    def all_reduce(self):
        for op_name in ("SUM", "AVG", "MAX"):
            t = self.inputs_for_reduce()
            before = t.clone()
            method = "native"
            try:
                dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name))
            except UNSUPPORTED:  # a backend without AVG: sum, then divide
                if op_name != "AVG":
                    raise
                t = before.clone()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t /= self.world_size
                method = "fallback: SUM then divide by world_size"
            self.report("all_reduce", f"all_reduce(op={op_name}): every rank gets the element-wise {op_name}",
                        before, t, note=None if method == "native" else method, op=op_name, method=method)

    def all_gather(self):
        t = 10 * (self.rank + 1) + torch.arange(2, dtype=torch.float32, device=self.device)
        out = [torch.zeros(2, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        self.report("all_gather", "all_gather: every rank gets every rank's tensor, in rank order", t, out)

    def gather(self):
        t = 10 * (self.rank + 1) + torch.arange(2, dtype=torch.float32, device=self.device)
        out = [torch.zeros(2, device=self.device) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(t, gather_list=out, dst=0)
        self.report("gather", "gather(dst=0): like all_gather, but only rank 0 gets the result", t, out)

    def scatter(self):
        chunks = None
        if self.rank == 0:  # only the source has something to hand out: one piece per rank
            chunks = [10 * (i + 1) + torch.arange(2, dtype=torch.float32, device=self.device)
                      for i in range(self.world_size)]
        out = torch.zeros(2, device=self.device)
        dist.scatter(out, scatter_list=chunks, src=0)
        self.report("scatter", "scatter(src=0): rank i gets piece i of rank 0's list", chunks, out)

    def reduce_scatter(self):
        # Each rank holds world_size pieces; rank i ends with the sum over ranks of everyone's piece i.
        # It is the first half of a ring all-reduce (see ring_all_reduce below).
        n, r = self.world_size, self.rank
        pieces = [(r + 1) * self.tensor([2 * i + 1, 2 * i + 2]) for i in range(n)]
        out = torch.zeros(2, device=self.device)
        method = "native"
        try:
            dist.reduce_scatter(out, pieces, op=dist.ReduceOp.SUM)
        except UNSUPPORTED:
            method = "fallback: all_reduce, keep own piece"
        # The fallback, for backends without reduce_scatter: all_reduce everything, keep your own
        # piece. Same result, but every rank receives all of it (world_size times the traffic).
        full = torch.cat(pieces)
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
        fallback = full.chunk(n)[r]
        if method != "native":
            out = fallback
        self.report("reduce_scatter", "reduce_scatter(op=SUM): rank i gets the sum over ranks of everyone's piece i",
                    pieces, out, note=f"{method}; fallback (all_reduce, keep own piece) agrees: "
                         f"{bool(torch.equal(out, fallback))}",
                    method=method, fallback=self.collect(fallback))

    def barrier(self):
        # Rank r arrives r * 0.2 s late; nobody leaves the barrier before the last one arrives.
        dist.barrier()
        delay = 0.2 * self.rank
        time.sleep(delay)
        start = time.perf_counter()
        dist.barrier()
        waited = time.perf_counter() - start
        self.report("barrier", "barrier: rank r arrives r*0.2 s late; before = arrival delay (s), after = time "
                    "waited in barrier() (s)", self.tensor([round(delay, 3)]), self.tensor([round(waited, 3)]),
                    note=f"the last rank ({self.world_size - 1}) waits ~0 s; rank 0 waits "
                         f"~{0.2 * (self.world_size - 1):.1f} s")

    def new_group(self):
        # Every rank must call new_group for every group, even groups it is not in, in the same order.
        evens = dist.new_group(list(range(0, self.world_size, 2)))
        odds = dist.new_group(list(range(1, self.world_size, 2)))
        mine = evens if self.rank % 2 == 0 else odds
        t = self.tensor([self.rank + 1])
        before = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mine)  # only the ranks of `mine` take part
        self.report("new_group", "new_group: one group of the even ranks, one of the odd ranks; all_reduce(SUM) "
                    "within each group", before, t,
                    note="with fewer than 4 processes a group has a single member: try 4" if self.world_size < 4
                    else None)
        dist.destroy_process_group(evens)
        dist.destroy_process_group(odds)

    # ---- a ring all-reduce made from send/recv ------------------------------------------------
    def ring_exchange(self, send, recv):
        """Send `send` to the right neighbour while receiving `recv` from the left one.
        batch_isend_irecv starts both at once, so no rank waits for another to finish sending first."""
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        ops = []  # a tensor shorter than world_size has empty chunks: nothing to send for those
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, right))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, left))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()

    def ring_all_reduce_by_hand(self, t, on_step=None):
        """Sum `t` over all ranks in place, the way NCCL and Gloo do for large tensors.

        Cut t into world_size chunks (they need not be equal: any length works).
        1. reduce-scatter, world_size-1 steps: at step s rank r sends chunk (r-s) to the right and adds
           the chunk (r-s-1) it receives from the left. Afterwards rank r holds the full sum of chunk r+1.
        2. all-gather, world_size-1 steps: pass the finished chunks around the ring, overwriting.
        Every rank sends and receives 2*(world_size-1)/world_size of the tensor in total, whatever the
        world size: that is why the ring is bandwidth-optimal.
        """
        n, r = self.world_size, self.rank
        chunks = list(t.tensor_split(n))  # views into t: writing a chunk writes t
        for step in range(n - 1):
            send, recv_into = chunks[(r - step) % n], chunks[(r - step - 1) % n]
            incoming = torch.empty_like(recv_into)
            self.ring_exchange(send, incoming)
            recv_into += incoming
            if on_step:
                on_step("reduce_scatter", step + 1, t)
        for step in range(n - 1):
            send, recv_into = chunks[(r + 1 - step) % n], chunks[(r - step) % n]
            self.ring_exchange(send, recv_into)
            if on_step:
                on_step("all_gather", step + 1, t)
        return t

    def ring_all_reduce(self):
        n, r = self.world_size, self.rank
        # 1. A small tensor whose length does not divide by world_size, every step shown and logged.
        t = (r + 1) * torch.arange(1, 2 * n + 2, dtype=torch.float32, device=self.device)
        before = t.clone()

        def on_step(phase, step, state):
            everyone = self.collect(state)
            self.say(f"    {phase} step {step}: " + "  ".join(f"rank {i} {fmt(v)}" for i, v in enumerate(everyone)))
            self.log({"demo": "ring_all_reduce", "world_size": n, "phase": phase, "step": step,
                      "state": everyone})

        self.say(f"--- ring_all_reduce: by hand from send/recv; {len(t)} values in {n} chunks, {n - 1} "
                 f"reduce-scatter step(s) then {n - 1} all-gather step(s)")
        self.say("    start: " + "  ".join(f"rank {i} {fmt(v)}" for i, v in enumerate(self.collect(t))))
        self.ring_all_reduce_by_hand(t, on_step)
        expected = before.clone()
        dist.all_reduce(expected)

        # 2. Random tensors of awkward sizes: the ring must agree with dist.all_reduce.
        sizes = [1, n + 1, 1000 * n + 1, 65537]
        diffs = []
        g = torch.Generator().manual_seed(100 + r)  # a different tensor on every rank
        for size in sizes:
            x = torch.randn(size, generator=g).to(self.device)
            mine, reference = self.ring_all_reduce_by_hand(x.clone()), x.clone()
            dist.all_reduce(reference)
            diffs.append((mine - reference).abs().max().item())  # sums in another order: rounding only
        worst = torch.tensor(max(diffs), device=self.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        matches = bool(torch.equal(t, expected)) and worst.item() < 1e-4
        self.report("ring_all_reduce", "ring_all_reduce: before = each rank's tensor, after = the ring's result",
                    before, t, note=f"equals dist.all_reduce: small tensor exactly {bool(torch.equal(t, expected))}; "
                         f"random sizes {sizes}: max abs difference {worst.item():.2e}",
                    sizes=sizes, max_abs_diff=worst.item(), matches_all_reduce=matches)

        # 3. Bandwidth: the same bytes through the ring and through dist.all_reduce.
        numel = max(n, int(self.bench_mb * 2**20) // 4)
        x = torch.randn(numel, device=self.device)
        figures = {}
        for name, fn in (("ring", self.ring_all_reduce_by_hand), ("all_reduce", dist.all_reduce)):
            fn(x)  # warm-up: connections are made on first use
            self.synchronize()
            start = time.perf_counter()
            for _ in range(self.bench_iters):
                fn(x)
            self.synchronize()
            seconds = torch.tensor((time.perf_counter() - start) / self.bench_iters, device=self.device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            figures[name] = seconds.item()
        size_bytes = numel * 4
        # "bus bandwidth" as nccl-tests defines it: the bytes each rank moves over its link per second.
        factor = 2 * (n - 1) / n
        busbw = {k: size_bytes * factor / s / 1e9 for k, s in figures.items()}
        self.say(f"--- ring_bandwidth: {size_bytes / 2**20:.1f} MiB float32, {self.bench_iters} iterations: "
                 f"ring by hand {figures['ring'] * 1e3:.2f} ms ({busbw['ring']:.2f} GB/s bus bandwidth) | "
                 f"dist.all_reduce {figures['all_reduce'] * 1e3:.2f} ms ({busbw['all_reduce']:.2f} GB/s)")
        self.log({"demo": "ring_bandwidth", "world_size": n, "bytes": size_bytes, "iterations": self.bench_iters,
                  "ring_s": figures["ring"], "all_reduce_s": figures["all_reduce"],
                  "ring_busbw_GBps": busbw["ring"], "all_reduce_busbw_GBps": busbw["all_reduce"]})

    def synchronize(self):
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    # ---- data parallelism by hand ------------------------------------------------------------
    def manual_ddp(self):
        """What DDP does, written out: same start, different data per rank, gradients averaged."""
        torch.manual_seed(0)  # the same initial weights on every rank
        model = torch.nn.Sequential(  # the small dense network of steps 01-03: 20 -> 64 -> 1
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(self.device)
        ddp_model = DDP(copy.deepcopy(model),
                        device_ids=None if self.device.type == "cpu" else [self.device.index])
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
        before = model[0].weight.flatten()[:4].clone()
        g = torch.Generator().manual_seed(1000 + self.rank)  # every rank its own batches
        for _ in range(self.manual_steps):
            x = torch.randn(16, 20, generator=g).to(self.device)
            y = x.sum(dim=1, keepdim=True)
            for m, o in ((model, opt), (ddp_model, ddp_opt)):
                o.zero_grad()
                F.mse_loss(m(x), y).backward()
                if m is model:
                    # The whole trick: after backward(), average every gradient over the ranks.
                    # (DDP does the same, but in buckets and overlapped with backward().)
                    for p in model.parameters():
                        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                        p.grad /= self.world_size
                o.step()
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ddp_model.module.parameters()))
        worst = torch.tensor(diff, device=self.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        ddp_after = self.collect(ddp_model.module[0].weight.flatten()[:4])
        self.report("manual_ddp", f"manual_ddp: first 4 weights; {self.manual_steps} SGD steps, each rank on its "
                    f"own batches, gradients averaged with all_reduce", before, model[0].weight.flatten()[:4],
                    note=f"DDP-wrapped copy after the same steps: rank 0 {fmt(ddp_after[0])}; "
                         f"max |manual - DDP| over all weights and ranks: {worst.item():.2e}",
                    steps=self.manual_steps, ddp_after=ddp_after, max_abs_diff=worst.item())


DEMOS = ["send_recv", "isend_irecv", "broadcast", "reduce", "all_reduce", "all_gather", "gather", "scatter",
         "reduce_scatter", "barrier", "new_group", "ring_all_reduce", "manual_ddp"]


def fmt(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def main(args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size < 2:  # checked before connecting: nothing to communicate with one process
        raise SystemExit(f"error: the collectives need at least 2 processes, got world size {world_size}; "
                         f"e.g. torchrun --standalone --nproc-per-node 2 04_collectives_intro.py")
    device, backend = pick_device(int(os.environ["LOCAL_RANK"]))
    ddp_setup(device, backend)
    rank = dist.get_rank()
    if rank == 0:
        print(f"[{device.type}:{rank}] device {device.type} | backend {backend} | world_size {world_size} | "
              f"threads per process {torch.get_num_threads()}")
    demos = Demos(device, args.log_file, args.bench_mb, args.bench_iters, args.manual_steps)
    names = DEMOS if args.demo is None else [args.demo]
    for name in names:
        getattr(demos, name)()
    if rank == 0:
        print(f"[{device.type}:{rank}] Finished training: {len(names)} demo(s) on world_size {world_size}")
    # Wait for every rank before tearing down. While a rank waits here, Gloo's threads finish with its
    # last collective; a thread still holding one of our tensors when Python shuts down aborts the
    # process ("terminate called without an active exception", a PyTorch bug: pytorch/pytorch#179291).
    dist.barrier()
    dist.destroy_process_group()


def spawn_main(local_rank: int, world_size: int, args):
    """mp.spawn entry: set the variables torchrun would set (one node), then run the same main()."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    main(args)


def free_port() -> int:
    """Ask the OS for a port nobody uses (binding port 0), so two runs on one machine never collide."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 04: one demo per torch.distributed primitive, a ring all-reduce by hand, and "
                    "gradient averaging by hand checked against DDP.",
        epilog="Start with torchrun (torchrun --standalone --nproc-per-node 2 04_collectives_intro.py) or "
               "plainly (python 04_collectives_intro.py --world_size 2).")
    parser.add_argument("--demo", choices=DEMOS, default=None, help="run only this demo (default: all)")
    parser.add_argument("--world_size", type=int, default=None,
                        help="without torchrun: processes to start (default: one per GPU, or 2 without GPUs)")
    parser.add_argument("--bench_mb", type=float, default=8.0,
                        help="MiB of float32 for the ring bandwidth measurement (default: 8)")
    parser.add_argument("--bench_iters", type=int, default=5, help="timed iterations per method (default: 5)")
    parser.add_argument("--manual_steps", type=int, default=5,
                        help="SGD steps in the manual_ddp demo (default: 5)")
    parser.add_argument("--log_file", default=None, help="append one JSON line per demo here (for plots)")
    args = parser.parse_args(argv)
    if args.bench_mb <= 0:
        parser.error("--bench_mb must be positive")
    for name in ("bench_iters", "manual_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if "LOCAL_RANK" in os.environ:  # started by torchrun: it decides the world size
        if args.world_size is not None:
            parser.error("--world_size is for starting without torchrun; under torchrun use --nproc-per-node")
        return args
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    gpus = torch.accelerator.device_count() if accelerator is not None and accelerator.type in BACKENDS else 0
    if args.world_size is None:
        args.world_size = max(gpus, 2)
    if args.world_size < 2:
        parser.error(f"--world_size must be at least 2: the collectives need at least 2 processes "
                     f"(got {args.world_size})")
    if gpus and args.world_size > gpus:
        parser.error(f"--world_size {args.world_size} asks for more processes than the {gpus} GPU(s) "
                     f"this machine has; this script uses one GPU per process")
    return args


if __name__ == "__main__":
    args = parse_args()
    if "LOCAL_RANK" in os.environ:  # torchrun started us: one process of many
        main(args)
    else:  # plain python: start world_size processes on this machine, as step 02 does
        os.environ["MASTER_ADDR"] = "localhost"
        os.environ["MASTER_PORT"] = str(free_port())
        mp.spawn(spawn_main, args=(args.world_size, args), nprocs=args.world_size)
