"""Do restarted torchrun workers still need a store prefix per attempt? Measured, not assumed.

torchrun (2.4 and later) serves one key-value store per job and hands it to every attempt of the
workers (TORCHELASTIC_USE_AGENT_STORE=True). `init_process_group("gloo")` writes each rank's
address under fixed keys of that store, so a restarted rank may read the address its dead
predecessor left there and fail with "Connection refused" (pytorch/pytorch#135712). This script
restarts a 2-rank job many times, on one node and on two torchrun "nodes" (c10d on 127.0.0.1),
and counts the attempts whose process group failed to form: with plain env:// (what the steps
do now) and, to compare, with a per-attempt PrefixStore (what they did before).

    python tools/restart_check.py                         # 30 restarts, one node and two, env://
    python tools/restart_check.py --restarts 3 --nodes 2  # a quick look
    python tools/restart_check.py --prefix                # with a store prefix per attempt

Each attempt: every rank starts, joins the process group, runs one all_reduce; the last rank then
raises (a planned crash) until the job has had --restarts good attempts. An attempt counts as good
when its all_reduce gave the right sum on every rank.
"""
import argparse
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from proc import end_session  # noqa: E402  (tools/proc.py)


def worker(folder: Path, restarts: int, prefix: bool):
    """One rank of one attempt (torchrun runs this file with --worker)."""
    import torch
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    with open(folder / "starts.log", "a") as f:
        f.write(f"{rank}\n")
    timeout = timedelta(seconds=60)
    if prefix:  # the steps' former store_for_this_attempt
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"attempt_{store.add(f'starts_of_rank_{rank}', 1)}", store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:  # the steps now: torchrun's variables, env:// underneath
        dist.init_process_group("gloo", timeout=timeout)
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == dist.get_world_size(), total
    if rank == 0:
        with open(folder / "good.log", "a") as f:
            f.write("ok\n")
    dist.barrier()  # every rank sees rank 0's line before deciding
    good = len((folder / "good.log").read_text().splitlines())
    if good <= restarts and rank == dist.get_world_size() - 1:
        raise SystemExit(f"planned crash after good attempt {good}")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(nodes: int, restarts: int, prefix: bool, folder: Path) -> dict:
    """Run the job; return its counts and the failure lines the workers printed."""
    folder.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    worker_args = [__file__, "--worker", str(folder), "--restarts", str(restarts)] + (["--prefix"] * prefix)
    # Room for failed attempts too: each also costs a restart.
    common = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", str(3 * restarts + 3)]
    start = time.perf_counter()
    if nodes == 1:
        cmds = [[*common, "--standalone", "--nproc-per-node", "2", *worker_args]]
    else:
        port = free_port()
        cmds = [[*common, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port}", "--rdzv-id", f"check-{port}", "--local-addr", "127.0.0.1", *worker_args]
                for _ in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in cmds]
    deadline, output, hung = time.monotonic() + 60 + 30 * restarts, "", False
    for p in procs:
        try:
            output += p.communicate(timeout=max(1, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            hung = True
            for q in procs:
                end_session(q)  # tools/proc.py: torchrun and its workers (sessions of their own)
            output += p.communicate()[0]
    seconds = time.perf_counter() - start
    starts = len((folder / "starts.log").read_text().splitlines()) if (folder / "starts.log").exists() else 0
    good = len((folder / "good.log").read_text().splitlines()) if (folder / "good.log").exists() else 0
    failures = [line.strip() for line in output.splitlines()
                if ("Error" in line or "refused" in line) and "planned crash" not in line
                and "Connection closed by peer" not in line
                and "ChildFailedError" not in line]
    return {"nodes": nodes, "prefix": prefix, "attempts": starts // 2, "good": good,
            "failed": starts // 2 - good, "exit": [p.returncode for p in procs], "hung": hung, "seconds": seconds,
            "failure_lines": sorted(set(failures))[:5]}


def main():
    parser = argparse.ArgumentParser(description="Count restarted torchrun attempts whose process group fails "
                                     "to form, with and without a per-attempt store prefix.")
    parser.add_argument("--restarts", type=int, default=30, help="planned restarts per job (default: 30)")
    parser.add_argument("--nodes", type=int, choices=(1, 2), action="append",
                        help="1: one torchrun, 2 ranks; 2: two torchruns, one rank each (default: both)")
    parser.add_argument("--prefix", action="store_true", help="a PrefixStore per attempt (the old steps)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "restart_check", help="scratch folder")
    args = parser.parse_args()
    if args.restarts < 1:
        parser.error("--restarts must be at least 1")
    if args.worker:
        return worker(args.worker, args.restarts, args.prefix)
    print(f"torch {__import__('torch').__version__} | {args.restarts} planned restarts per job | store "
          + ("prefix per attempt" if args.prefix else "plain env://"), flush=True)
    bad = 0
    for nodes in args.nodes or (1, 2):
        folder = args.out / f"{nodes}node_{'prefix' if args.prefix else 'env'}_{os.getpid()}_{time.time_ns()}"
        r = measure(nodes, args.restarts, args.prefix, folder)
        print(f"{nodes} node(s): {r['attempts']} attempts, {r['good']} good, {r['failed']} failed to form the "
              f"process group | torchrun exit {r['exit']}" + (" | HUNG: ended" if r["hung"] else "")
              + f" | {r['seconds']:.0f} s", flush=True)
        for line in r["failure_lines"]:
            print(f"    {line[:160]}")
        bad += r["failed"] > 0 or any(r["exit"]) or r["good"] != args.restarts + 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
