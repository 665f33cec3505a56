"""Processes or threads? Step 05 on this node's cores, split two ways, timed in one run.

    python tools/cpu_split.py                 # 2 processes x 1 thread vs 1 process x 2 threads
    python tools/cpu_split.py --cores 4 --repeats 5

Both ways train on the same global batch (the one process takes batches twice as large) and
run alternately, so a busy machine slows both alike. The time is the training time per epoch
from step 05's --log_file, epoch 0 left out (it includes start-up); the ratio is of medians.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from proc import run  # noqa: E402  (tools/proc.py)


def epoch_seconds(processes: int, threads: int, batch: int, epochs: int, folder: Path) -> list:
    log = folder / f"{processes}x{threads}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           processes, REPO / "05_singlenode_cpu.py", "--threads", threads, "--batch_size", batch,
           "--max_epochs", epochs, "--save_every", epochs, "--snapshot_path", folder / "s.pt",
           "--log_file", log]
    (folder / "s.pt").unlink(missing_ok=True)
    done = run(cmd, cwd=folder, timeout=600, merge_output=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}")
    return [json.loads(line)["epoch_time_s"] for line in log.read_text().splitlines()][1:]


def main():
    parser = argparse.ArgumentParser(description="Time step 05 as N processes x 1 thread and as "
                                     "1 process x N threads, alternately, and print the ratio.")
    parser.add_argument("--cores", type=int, default=2, help="N (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way (default: 3)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default: 4)")
    args = parser.parse_args()
    if min(args.cores, args.repeats) < 1 or args.epochs < 2:
        parser.error("--cores and --repeats must be at least 1, --epochs at least 2")
    ways = {f"{args.cores} processes x 1 thread": (args.cores, 1, 32),
            f"1 process x {args.cores} threads": (1, args.cores, 32 * args.cores)}
    times = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for name, (processes, threads, batch) in ways.items():
                times[name] += epoch_seconds(processes, threads, batch, args.epochs, Path(folder))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name:28s} median epoch {median:.3f} s over {len(times[name])} epochs")
    (many, one) = medians.values()
    print(f"processes over threads: {one / many:.2f}x the speed")


if __name__ == "__main__":
    main()
