"""Do restarted torchrun workers still need a store prefix per attempt? Measured, not assumed.

torchrun (2.4 and later) serves one key-value store per job and hands it to every attempt of
its workers (TORCHELASTIC_USE_AGENT_STORE=True); init_process_group("gloo") writes each rank's
address under fixed keys of it, so a restarted rank may read the address a dead one left there
(pytorch/pytorch#135712). This script restarts a 2-rank job many times, on one node and on two
torchrun "nodes" (c10d on 127.0.0.1), and counts the attempts whose process group fails to
form: with the steps' store (plumbing.restart_safe_store: a prefix per attempt) or with plain
env:// (init_process_group's default).

    python tools/restart_check.py                      # 30 restarts, one node and two, steps' store
    python tools/restart_check.py --store plain        # the same with plain env://
    python tools/restart_check.py --restarts 3 --nodes 2

Each attempt: every rank starts, joins the process group, runs one all_reduce; then the last
rank raises (a planned crash) until the job has had --restarts good attempts. An attempt is
good when its all_reduce gave the right sum. Measured on torch 2.13 (2-core machine, busy):
steps' store 31 of 31 attempts good on one node and on two; plain env:// 2 of 7 on one node and
10 of 23 on two ("Gloo connectFullMesh failed ... Connection refused") before the job gave up.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from proc import end_session  # noqa: E402  (tools/proc.py)


def worker(folder: Path, restarts: int, store: str):
    """One rank of one attempt (torchrun runs this file with --worker)."""
    import torch
    import torch.distributed as dist

    import plumbing
    with open(folder / "starts.log", "a") as f:
        f.write(f"{os.environ['RANK']}\n")
    timeout = timedelta(seconds=60)
    if store == "steps":
        dist.init_process_group("gloo", timeout=timeout, **plumbing.restart_safe_store("gloo",
                                                                                      timeout))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == dist.get_world_size(), total
    if dist.get_rank() == 0:
        with open(folder / "good.log", "a") as f:
            f.write("ok\n")
    dist.barrier()  # every rank sees rank 0's line before deciding
    good = len((folder / "good.log").read_text().splitlines())
    if good <= restarts and dist.get_rank() == dist.get_world_size() - 1:
        raise SystemExit(f"planned crash after good attempt {good}")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def measure(nodes: int, restarts: int, store: str, folder: Path) -> dict:
    """Run the job; its counts and the failure lines the workers printed."""
    folder.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    work = [__file__, "--worker", folder, "--restarts", restarts, "--store", store]
    # Room for failed attempts too: each costs a restart.
    common = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", 3 * restarts + 3]
    if nodes == 1:
        cmds = [[*common, "--standalone", "--nproc-per-node", 2, *work]]
    else:
        port = free_port()
        cmds = [[*common, "--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"check-{port}",
                 "--local-addr", "127.0.0.1", *work]] * 2
    start = time.perf_counter()
    procs = [subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for cmd in cmds]
    deadline, output, hung = time.monotonic() + 60 + 60 * restarts, "", False
    for p in procs:
        try:
            output += p.communicate(timeout=max(1, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            hung = True
            for q in procs:
                end_session(q)  # torchrun and its workers (sessions of their own)
            output += p.communicate()[0]
    attempts, good = lines(folder / "starts.log") // 2, lines(folder / "good.log")
    failures = [line.strip() for line in output.splitlines()
                if ("Error" in line or "refused" in line) and "planned crash" not in line
                and "Connection closed by peer" not in line and "ChildFailedError" not in line]
    return {"attempts": attempts, "good": good, "exit": [p.returncode for p in procs],
            "hung": hung, "seconds": time.perf_counter() - start,
            "failure_lines": sorted(set(failures))[:5]}


def main():
    parser = argparse.ArgumentParser(description="Count restarted torchrun attempts whose process "
                                     "group fails to form.")
    parser.add_argument("--restarts", type=int, default=30, help="planned restarts (default: 30)")
    parser.add_argument("--nodes", type=int, choices=(1, 2), action="append",
                        help="1: one torchrun of 2 ranks; 2: two of 1 rank (default: both)")
    parser.add_argument("--store", choices=("steps", "plain"), default="steps",
                        help="steps: plumbing.restart_safe_store; plain: env:// (default: steps)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "restart_check",
                        help="scratch folder (default: runs/restart_check)")
    args = parser.parse_args()
    if args.restarts < 1:
        parser.error("--restarts must be at least 1")
    if args.worker:
        return worker(args.worker, args.restarts, args.store)
    import torch
    print(f"torch {torch.__version__} | {args.restarts} planned restarts per job | store: "
          f"{args.store}", flush=True)
    bad = False
    for nodes in args.nodes or (1, 2):
        folder = args.out / f"{nodes}node_{args.store}_{time.time_ns()}"
        r = measure(nodes, args.restarts, args.store, folder)
        print(f"{nodes} node(s): {r['attempts']} attempts, {r['good']} good, "
              f"{r['attempts'] - r['good']} failed to form the process group | torchrun exit "
              f"{r['exit']}" + (" | hung: ended" if r["hung"] else "") + f" | {r['seconds']:.0f} s",
              flush=True)
        for line in r["failure_lines"]:
            print(f"    {line[:160]}")
        bad |= r["good"] != args.restarts + 1 or r["hung"] or any(r["exit"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
