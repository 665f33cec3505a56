"""The three errors every DDP user meets, each made to happen on 2 CPU processes in seconds, and its
fix.

    python notebooks/ddp_errors.py --error unused          # a parameter gets no gradient: it raises
    python notebooks/ddp_errors.py --error unused --fix    # DDP(model, find_unused_parameters=True)
    python notebooks/ddp_errors.py --error uneven          # one rank has more batches: a timeout
    python notebooks/ddp_errors.py --error uneven --fix    # with Join([model]):
    python notebooks/ddp_errors.py --error partial         # only rank 0 calls all_reduce: a timeout
    python notebooks/ddp_errors.py --error partial --fix   # every rank calls every collective
    python notebooks/ddp_errors.py --error partial --show_stacks  # where is each rank stuck?

Where is each rank stuck? Every rank registers Python's faulthandler for SIGUSR1 (not on
Windows, which lacks it) before it does anything else: `kill -USR1 PID` makes that process print
the Python stack of each of its threads, even while it waits inside a collective. With
--show_stacks this parent does it for you, every 0.5 s; once every rank still running shows the
same stack twice, it prints them, tagged with the rank, with the line of this file each rank
waits on. Started by torchrun instead, each process is one rank, for trying what you would do
with a real job (see TROUBLESHOOTING.md, "Where is each rank stuck?"):

    torchrun --standalone --nproc-per-node 2 notebooks/ddp_errors.py --error partial --timeout_s 60
    py-spy dump --subprocesses --pid PID   # PID: torchrun's (pgrep -af torchrun); or kill -USR1 ...

Nothing here can hang. The process group has a short timeout (--timeout_s, 5 s): a rank that waits
for a peer that never comes fails with an error instead of waiting forever (a real training script
would give it minutes). And this parent process kills whatever still runs after --deadline_s.
Exit code: 0 when every rank finished, 1 when one failed (the error shown), 2 for bad flags.
"""
import argparse
import contextlib
import datetime
import faulthandler
import json
import linecache
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP


class TwoHeads(torch.nn.Module):
    """A body with two heads, where forward() only uses the first: `aux` (say, a head for another
    task, switched off in this configuration) never contributes to the loss, so its parameters get
    no gradient."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 1)
        self.aux = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def batches(rank, count):
    """`count` batches of 8 samples, different on every rank (as its share of the data would be)."""
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(count):
        x = torch.randn(8, 8, generator=g)
        yield x, x.sum(dim=1, keepdim=True)


def train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()  # DDP all-reduces the gradients here: every rank must take part
    optimizer.step()
    return loss.item()


def same_on_every_rank(model) -> bool:
    """True if this rank's weights equal rank 0's (checked on every rank, agreed by all)."""
    mine = torch.cat([p.detach().flatten() for p in model.parameters()])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    differ = torch.tensor([float(not torch.equal(mine, theirs))])
    dist.all_reduce(differ, op=dist.ReduceOp.MAX)
    return differ.item() == 0


def unused(rank, fix, say):
    """a) A parameter that gets no gradient. DDP waits, in every backward(), for every parameter's
    gradient before it starts the last bucket's all-reduce; `aux` never gets one, so the reduction
    never finishes, and the next forward() finds it unfinished and raises."""
    torch.manual_seed(0)
    # find_unused_parameters=True: after each forward(), DDP walks the autograd graph from the
    # outputs and marks the parameters it does not reach as ready. It costs that walk at every step.
    model = DDP(TwoHeads(), find_unused_parameters=fix)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(batches(rank, 3)):
        say(f"step {step} | loss {train_step(model, optimizer, x, y):.4f}")
    say(f"aux.weight.grad is {model.module.aux.weight.grad} | weights the same on every rank: "
        f"{same_on_every_rank(model)}")


def uneven(rank, fix, say):
    """b) Uneven inputs: each rank reads its own shard, and the shards differ in size (rank r gets
    3 + 2r batches). In every backward() DDP all-reduces with the other ranks; once rank 0 has run
    out of data, rank 1's next all-reduce waits for a partner that never comes."""
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    shard = 3 + 2 * rank
    say(f"my shard: {shard} batches")
    # Join: a rank that has run out of batches keeps answering the others' all-reduces (with zeros)
    # until every rank has finished, then the ranks agree on the final weights.
    with Join([model]) if fix else contextlib.nullcontext():
        for step, (x, y) in enumerate(batches(rank, shard)):
            say(f"step {step} | loss {train_step(model, optimizer, x, y):.4f}")
    say(f"out of data after {shard} steps")
    if fix:
        say(f"weights the same on every rank: {same_on_every_rank(model)}")


def partial(rank, fix, say):
    """c) A collective that only some ranks call. Every collective (all_reduce, broadcast, barrier,
    ...) must be called by every rank of the group, in the same order. Here rank 0 alone, the one
    that prints, sums the ranks' validation losses."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = next(batches(rank, 1))
    with torch.no_grad():
        total = F.mse_loss(model(x), y).reshape(1)  # this rank's validation loss
    say(f"my validation loss {total.item():.4f}")
    # The bug: `if rank == 0:` around the all_reduce, not only around the print.
    if fix or rank == 0:
        dist.all_reduce(total)  # sum over ranks; every rank must call it
    if rank == 0:
        say(f"mean validation loss over the ranks {total.item() / dist.get_world_size():.4f}")


ERRORS = {"unused": unused, "uneven": uneven, "partial": partial}


def worker(rank, args, port=None, started=None):
    """One rank. `port`: the rendezvous port on this machine (None: torchrun set MASTER_ADDR/PORT);
    `started`: a counter shared with the parent, of the ranks whose process group is up."""
    # One write per line: the ranks' lines never mix.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    # First, so that even a rank stuck in init_process_group can say where. faulthandler writes from
    # the signal handler itself, no Python code runs: it answers while we wait in C++ (Gloo, NCCL).
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        stack_file = open(stack_path(args.stacks_dir, rank), "w") if args.stacks_dir else sys.stderr
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    def say(message):
        print(f"[cpu rank {rank}] {message}")

    torch.set_num_threads(1)
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The timeout: how long a collective waits for the other ranks before it raises.
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    if started is not None:
        with started.get_lock():
            started.value += 1
    if rank == 0:
        say(f"device cpu | backend gloo | world_size {args.world_size} | error {args.error} | "
            f"fix {'on' if args.fix else 'off'} | process-group timeout {args.timeout_s:g} s")
    start = time.perf_counter()
    try:
        ERRORS[args.error](rank, args.fix, say)
        if args.at_end == "barrier":  # wait for the others, as every step of this tutorial does
            dist.barrier()
    except Exception as error:  # what a learner would see; then this process fails
        say(f"{type(error).__name__} after {time.perf_counter() - start:.1f} s, {where(error)}:")
        for line in str(error).strip().splitlines()[:8]:
            say(f"  {line.strip()}")
        log(args, rank, time.perf_counter() - start, error)
        sys.stdout.flush()
        if under_torchrun():
            raise  # for @record: torchrun's report then shows this error and where it came from
        os._exit(1)  # at once: a peer may still be stuck, so no clean shutdown of the process group
    say(f"finished after {time.perf_counter() - start:.1f} s")
    log(args, rank, time.perf_counter() - start)
    if args.at_end == "barrier":  # with --at_end exit: leave without a word to the others
        dist.destroy_process_group()
    # Skip the interpreter's shutdown, where a Gloo thread still giving back the last collective's
    # tensor can abort a process that has finished its work (TROUBLESHOOTING.md, "Aborted at
    # exit"); in this demo, that would look like one more error.
    sys.stdout.flush()
    os._exit(0)


def where(error) -> str:
    """Where in this file the error came out: 'in train_step(), at `loss.backward()`'."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
    if not frames:
        return "outside this file"
    return f"in {frames[-1].name}(), at `{frames[-1].line.split('  #')[0]}`"


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def stack_path(stacks_dir, rank) -> str:
    return os.path.join(stacks_dir, f"stack_rank{rank}.txt")


SAMPLE_EVERY_S = 0.5  # --show_stacks: how often it asks the ranks for their stacks


def sample_stacks(processes, stacks_dir) -> dict:
    """{rank: its Python stack now} for every rank still running: SIGUSR1 makes faulthandler
    append the stack of each of its threads to the rank's file; we read what came."""
    stacks = {}
    for rank, process in enumerate(processes):
        path = stack_path(stacks_dir, rank)
        before = os.path.getsize(path) if os.path.exists(path) else 0
        if not process.is_alive():
            continue
        os.kill(process.pid, signal.SIGUSR1)
        stacks[rank] = read_when_complete(path, before)
    return stacks


def read_when_complete(path, offset, limit_s=5.0) -> str:
    """What faulthandler wrote to `path` after `offset`, once it has stopped growing."""
    text, deadline = "", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        with open(path) as f:
            f.seek(offset)
            now = f.read()
        if now and now == text:
            return text
        text = now
    return text or "(no stack came: did the process register faulthandler for SIGUSR1?)\n"


def stack_frames(stack: str) -> list:
    """(file, line, function) of each frame in a faulthandler dump, innermost first."""
    return re.findall(r'File "(.+)", line (\d+) in (.+)', stack)


def frames_of(stacks: dict) -> dict:
    return {rank: stack_frames(stack) for rank, stack in stacks.items()}


def show_stacks(processes, stacks):
    """Print each rank's stack, tagged with the rank, with the source of each line of this file it
    passes through, and then the line it waits on."""
    print(f"ddp_errors: every rank still running showed the same Python stack twice, "
          f"{SAMPLE_EVERY_S:g} s apart: waiting (or in one long call). Their stacks "
          f"(kill -USR1 PID, answered by faulthandler), innermost call first:")
    for rank, stack in stacks.items():
        tag = f"[cpu rank {rank}]"
        print(f"{tag} pid {processes[rank].pid}")
        waits_at = None
        for line in stack.splitlines():
            frame = stack_frames(line)
            if frame and frame[0][2] == "_wrap" and "multiprocessing" in frame[0][0]:
                break  # below worker(): how mp.spawn started this process, the same for every rank
            print(f"{tag} {line}")
            if frame and os.path.abspath(frame[0][0]) == os.path.abspath(__file__):
                source = linecache.getline(__file__, int(frame[0][1])).strip()
                print(f"{tag}       {source}")
                waits_at = waits_at or (f"line {frame[0][1]} in {frame[0][2]}(): "
                                        f"{source.split('  #')[0]}")
        innermost = stack_frames(stack)[0][2] if stack_frames(stack) else "?"
        print(f"{tag} waits in {innermost}(), called at {waits_at or 'no line of this file'}")


def log(args, rank, seconds, error=None):
    """One JSON line per rank in --log_file: how it ended, and when (for the notebook's picture)."""
    if args.log_file:
        record = {"error": args.error, "fix": args.fix, "at_end": args.at_end, "rank": rank,
                  "outcome": "failed" if error else "finished", "seconds": round(seconds, 3)}
        if error:
            record.update(exception=type(error).__name__,
                          message=str(error).strip().splitlines()[0])
        with open(args.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: the ranks' lines never mix


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Reproduce one of the three classic DDP errors on CPU processes (Gloo), or run "
                    "its fix.")
    parser.add_argument("--error", required=True, choices=sorted(ERRORS),
                        help="unused: a parameter without gradient; uneven: ranks with different "
                             "numbers of batches; partial: a collective that only rank 0 calls")
    parser.add_argument("--fix", action="store_true", help="run the fixed version")
    parser.add_argument("--at_end", choices=["barrier", "exit"], default="barrier",
                        help="what a rank does when its work is done: wait for the others in "
                             "dist.barrier() (default) or exit at once")
    parser.add_argument("--world_size", type=int, default=2, help="processes to start (default: 2)")
    parser.add_argument("--log_file", default=None,
                        help="append one JSON line per rank here: how it ended, when")
    parser.add_argument("--timeout_s", type=float, default=5.0,
                        help="process-group timeout in seconds (default: 5)")
    parser.add_argument("--deadline_s", type=float, default=60.0,
                        help="kill every process still running after this many seconds "
                             "(default: 60)")
    parser.add_argument("--show_stacks", action="store_true",
                        help="where is each rank stuck? Print the Python stack of every rank "
                             "that stands still (the same stack twice, 0.5 s apart)")
    args = parser.parse_args(argv)
    if under_torchrun():  # torchrun's --nproc-per-node and --nnodes set the number of processes
        args.world_size = int(os.environ["WORLD_SIZE"])
    if args.show_stacks and (under_torchrun() or not hasattr(signal, "SIGUSR1")):
        parser.error("--show_stacks: only without torchrun (under it, use py-spy dump or kill "
                     "-USR1: see the docstring) and not on Windows (it lacks SIGUSR1)")
    if args.world_size < 2:
        parser.error("--world_size must be at least 2: these errors need two processes")
    if args.timeout_s <= 0 or args.deadline_s <= 0:
        parser.error("--timeout_s and --deadline_s must be positive")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(exitcode: int) -> str:
    """An exit code, with the signal's name when a signal ended the process (-11: SIGSEGV)."""
    return f"{exitcode} ({signal.Signals(-exitcode).name})" if exitcode < 0 else str(exitcode)


@record  # under torchrun: an exception that ends this process goes to torchrun's error file
def main():
    args = parse_args()
    args.stacks_dir = tempfile.mkdtemp(prefix="ddp_errors_stacks_") if args.show_stacks else None
    if under_torchrun():  # this process is one rank
        worker(int(os.environ["RANK"]), args)  # it ends the process
    sys.stdout.reconfigure(line_buffering=True)  # the stacks come out while the ranks still wait
    port = int(os.environ.get("MASTER_PORT") or free_port())
    start = time.monotonic()
    started = mp.get_context("spawn").Value("i", 0)  # ranks whose process group is up
    context = mp.spawn(worker, args=(args, port, started), nprocs=args.world_size, join=False)
    processes = context.processes
    watch = args.show_stacks  # until the stacks have been shown
    last_sample, next_sample = None, None
    try:
        while any(p.is_alive() for p in processes) and time.monotonic() - start < args.deadline_s:
            time.sleep(0.05)
            if next_sample is None and started.value == args.world_size:
                next_sample = time.monotonic()  # every rank's process group is up: watch them
            # A rank whose stack does not change is waiting (or in a long computation: a single
            # look cannot tell, it might catch a rank importing a module). The timeout must not
            # have ended them before the second look: sample often.
            if watch and next_sample is not None and time.monotonic() >= next_sample:
                sample = sample_stacks(processes, args.stacks_dir)
                if sample and last_sample and frames_of(sample) == frames_of(last_sample):
                    show_stacks(processes, sample)
                    watch = False
                last_sample, next_sample = sample, time.monotonic() + SAMPLE_EVERY_S
    # The last resort (or Ctrl-C): the process-group timeout should have ended them long before.
    finally:
        stuck = [rank for rank, p in enumerate(processes) if p.is_alive()]
        for rank in stuck:
            processes[rank].kill()
    for p in processes:
        p.join()
    if args.stacks_dir:
        shutil.rmtree(args.stacks_dir, ignore_errors=True)
    if watch:
        print("ddp_errors: no stacks shown: no rank stood still long enough to be seen waiting")
    codes = ", ".join(f"rank {rank} {describe(p.exitcode)}" for rank, p in enumerate(processes))
    print(f"ddp_errors: exit codes {codes} | {time.monotonic() - start:.1f} s"
          + (f" | killed after the {args.deadline_s:g} s deadline: ranks {stuck}" if stuck else ""))
    sys.exit(0 if all(p.exitcode == 0 for p in processes) else 1)


if __name__ == "__main__":
    main()
