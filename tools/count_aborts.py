"""Run a command N times and count the runs that aborted at exit (Gloo's
"terminate called without an active exception", SIGABRT) apart from other failures.

    python tools/count_aborts.py --repo . --runs 50 --expect "Finished training" -- \\
        torchrun --standalone --nproc-per-node 2 {repo}/06_amp.py --dtype bf16 --max_epochs 1

Every run starts in a fresh empty folder (snapshots and checkpoints never carry over) under
tools/proc.py's time limit, which also ends torchrun's workers. In the command, {repo} is the
repository's absolute path; a leading `python` or `torchrun` is the one beside this interpreter.
The last line printed is a Markdown table row: command | runs | aborts | other failures | seconds.
"""
import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proc  # noqa: E402  (tools/proc.py: a time limit that also ends torchrun's workers)

# What an exit abort leaves in the output: libstdc++'s line, torchrun's report of a worker that
# died of SIGABRT (exitcode -6, "Signal 6 (SIGABRT)"), mp.spawn's "terminated with signal SIGABRT".
ABORT = re.compile(r"terminate called without an active exception|SIGABRT|exitcode\s*:\s*-6\b")


def resolve(command: list, repo: Path) -> list:
    command = [part.replace("{repo}", str(repo)) for part in command]
    here = Path(sys.executable).parent
    if command[0] == "python":
        command[0] = sys.executable
    elif command[0] == "torchrun" and (here / "torchrun").exists():
        command[0] = str(here / "torchrun")
    return command


def classify(done, expect: str) -> str:
    """'abort', 'other' (failed, timed out, or missing the expected text) or 'ok'."""
    output = done.stdout or ""
    if done.returncode == -signal.SIGABRT or ABORT.search(output):
        return "abort"
    if done.timed_out or done.returncode != 0 or (expect and expect not in output):
        return "other"
    return "ok"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=".", help="the repository to run against (default: .)")
    parser.add_argument("--runs", type=int, default=20, help="how many runs (default: 20)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per run (default: 180)")
    parser.add_argument("--expect", default="",
                        help="text a good run prints (e.g. 'Finished training'); else: other")
    parser.add_argument("--label", default="", help="the row's first column (default: the command)")
    parser.add_argument("--keep-logs", metavar="DIR", default="",
                        help="save the output of every abort and other failure here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command ({repo})")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    repo = Path(args.repo).resolve()
    if not command:
        parser.error("give the command after --")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not repo.is_dir():
        parser.error(f"--repo {args.repo}: no such folder")
    cmd = resolve(command, repo)
    if shutil.which(cmd[0]) is None:
        parser.error(f"{cmd[0]}: no such command")
    logs = Path(args.keep_logs).resolve() if args.keep_logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    counts = {"ok": 0, "abort": 0, "other": 0}
    start = time.perf_counter()
    for run in range(1, args.runs + 1):
        folder = tempfile.mkdtemp(prefix="count_aborts_")
        try:
            done = proc.run(cmd, cwd=folder, env=dict(os.environ), timeout=args.timeout,
                            merge_output=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        verdict = classify(done, args.expect)
        counts[verdict] += 1
        note = " (timed out)" if done.timed_out else f" (exit {done.returncode})"
        print(f"run {run}/{args.runs}: {verdict}{note if verdict != 'ok' else ''}", file=sys.stderr,
              flush=True)
        if logs and verdict != "ok":
            (logs / f"run{run:04d}_{verdict}.log").write_text(done.stdout or "")
    seconds = time.perf_counter() - start
    label = args.label or " ".join(command)
    print("| command | runs | aborts | other failures | seconds |")
    print("|---|---|---|---|---|")
    print(f"| `{label}` | {args.runs} | {counts['abort']} | {counts['other']} | {seconds:.0f} |")
    return 1 if counts["abort"] or counts["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
