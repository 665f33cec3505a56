"""Lesson mutants: the one-line bugs the lessons warn about, each planted in a scratch copy of the
repository, and the tests that claim to catch it run there. A test run that still passes means the
claim is false: the mutant SURVIVED.

    .venv/bin/python tools/mutants.py               # every mutant (make mutants)
    .venv/bin/python tools/mutants.py --only a,b    # some, by name
    .venv/bin/python tools/mutants.py --check       # only check that every snippet is found, once

Each mutant names a file, an exact snippet of it and the snippet's replacement. A snippet that is
not in the file, or is there more than once, is an error: when the code changes, the list fails
loudly instead of planting nothing. To re-anchor an entry, copy the line as it now is into `find`.

The scratch copy holds the tracked files (git ls-files) as they are in the working tree; the
virtualenv is not copied, the tests run with this interpreter. First the tests of all mutants run
once on the unmutated copy (a failing test there would make every "killed" meaningless; skip it
with --skip-baseline only right after `make test` passed), then each mutant in turn, with `-x`:
the first failing test kills it. Prints a Markdown table (for tests/README.md); exit code 1 if a
mutant survived, has no test, a snippet is off or the baseline fails.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proc  # noqa: E402  (tools/proc.py: a time limit that also ends torchrun's workers)

REPO = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 900  # one mutant's test run; a test that hangs is ended by pytest-timeout first
T = "tests/"


def at(indent: int, text: str) -> str:
    """`text` with every line indented by `indent` spaces: a snippet as it stands in its file."""
    return "\n".join(" " * indent + line for line in text.split("\n"))


MUTANTS = [
    # ---- minGPT-ddp ------------------------------------------------------------------------------
    dict(
        name="accum-sum",
        why="backward() before dividing the loss by the accumulation steps: a sum, not a mean",
        file="minGPT-ddp/trainer.py",
        find=at(16, """loss = loss / self.accum_steps  # so the accumulated gradient is a mean
with record_function("backward"):
    self.scaler.scale(loss).backward()"""),
        replace=at(16, """with record_function("backward"):
    self.scaler.scale(loss).backward()
loss = loss / self.accum_steps"""),
        tests=[T + "test_mingpt_train.py::test_accumulation_is_a_mean_over_the_larger_batch"],
    ),
    dict(
        name="no-sync-after-forward",
        why="no_sync() around backward() only: DDP decided in forward() to all-reduce",
        file="minGPT-ddp/trainer.py",
        find=at(12, """with self.gradient_sync(enabled=micro_step == self.accum_steps - 1):
    # (record_function: names on the profiler's timeline, notebook 08)
    with self.autocast, record_function("forward"):
        _, loss = train_model(x, y)"""),
        replace=at(12, """with self.autocast, record_function("forward"):
    _, loss = train_model(x, y)
with self.gradient_sync(enabled=micro_step == self.accum_steps - 1):"""),
        tests=[T + "test_mingpt_train.py::test_accumulation_sends_once_per_step"],
    ),
    dict(
        name="fsdp-sync-always",
        why="FSDP's set_requires_gradient_sync left on during accumulation",
        file="minGPT-ddp/trainer.py",
        find="            self.raw_model.set_requires_gradient_sync(enabled)",
        replace="            self.raw_model.set_requires_gradient_sync(True)",
        tests=[T + "test_mingpt_train.py::test_accumulation_sends_once_per_step"],
    ),
    dict(
        name="mingpt-model-alive-at-teardown",
        why="main.py keeps the trainer while ddp_setup.stop() destroys the group: Gloo's threads "
        "outlive it (the exit abort)",
        file="minGPT-ddp/main.py",
        find="        trainer = None  # the model holds the process group: let go of it first",
        replace="        pass  # the model holds the process group: let go of it first",
        tests=[T + "test_mingpt_train.py::test_nodes_with_the_same_snapshot_resume_together"],
    ),
    dict(
        name="fsdp-mesh-keeps-group",
        why="ddp_setup.stop() leaves the DeviceMesh its process group: the mesh outlives the model "
        "and keeps Gloo's threads (the exit abort, under FSDP)",
        file="minGPT-ddp/ddp_setup.py",
        find='        getattr(mesh, "_pg_registry", {}).clear()',
        replace="        pass",
        tests=[T + "test_mingpt_train.py::test_what_a_learner_sees"],
    ),
    dict(
        name="fsdp-model-not-collected",
        why="no gc.collect() in ddp_setup.stop(): a dropped FSDP model (a reference cycle) still "
        "holds the group when it is destroyed",
        file="minGPT-ddp/ddp_setup.py",
        find="    gc.collect()\n    if rt.distributed",
        replace="    if rt.distributed",
        tests=[T + "test_mingpt_train.py::test_what_a_learner_sees"],
    ),
    # ---- the steps' teardown (plumbing.py, step 06) ----------------------------------------------
    dict(
        name="late-torch-distributed-nn",
        why="torch.distributed.nn not imported before init: DDP imports it later and its default "
        "arguments keep the group, so Gloo's threads outlive destroy_process_group() (exit abort)",
        file="plumbing.py",
        find="import torch.distributed.nn  # noqa: F401  before any process group",
        replace="#",
        tests=[
            T + "test_ddp_equivalence.py::test_every_rank_ends_where_one_process_on_the_union_ends"
        ],
    ),
    dict(
        name="06-model-alive-at-teardown",
        why="no `del trainer` before destroy_process_group(): DDP keeps the group and Gloo's "
        "threads (the exit abort)",
        file="06_amp.py",
        find="    del trainer  # DDP holds the group: drop it first",
        replace="    pass  # DDP holds the group: drop it first",
        tests=[T + "test_06_amp.py::test_fp32_is_step_05_exactly"],
    ),
    # ---- step 02 ---------------------------------------------------------------------------------
    dict(
        name="02-no-set-epoch",
        why="sampler.set_epoch deleted: every epoch the same split and order",
        file="02_multigpu_mp_spawn.py",
        find="        self.train_data.sampler.set_epoch(epoch)",
        replace="        pass",
        tests=[
            T + "test_ddp_equivalence.py::test_every_rank_ends_where_one_process_on_the_union_ends"
        ],
    ),
    dict(
        name="02-no-distributed-sampler",
        why="no DistributedSampler: every rank trains on all the data",
        file="02_multigpu_mp_spawn.py",
        find="sampler=DistributedSampler(dataset),",
        replace="sampler=DistributedSampler(dataset, num_replicas=1, rank=0),",
        tests=[
            T + "test_ddp_equivalence.py::test_every_rank_ends_where_one_process_on_the_union_ends"
        ],
    ),
    dict(
        name="02-rank-lr",
        why="a learning rate that depends on the rank (ranks >= 1)",
        file="02_multigpu_mp_spawn.py",
        find="lr=args.lr, momentum=0.9)",
        replace="lr=args.lr * (1 + 0.01 * dist.get_rank()), momentum=0.9)",
        tests=[
            T + "test_ddp_equivalence.py::test_every_rank_ends_where_one_process_on_the_union_ends"
        ],
    ),
    # ---- step 03 ---------------------------------------------------------------------------------
    dict(
        name="03-no-set-epoch",
        why="sampler.set_epoch deleted",
        file="03_multigpu_torchrun.py",
        find="        self.train_data.sampler.set_epoch(epoch)",
        replace="        pass",
        tests=[
            T + "test_resume_and_faults.py::"
            "test_resumed_and_restarted_run_ends_where_one_process_on_the_union_ends"
        ],
    ),
    dict(
        name="03-epochs-run",
        why="epochs_run = epoch instead of epoch + 1: a resumed run trains an epoch twice",
        file="03_multigpu_torchrun.py",
        find='"epochs_run": epoch + 1}',
        replace='"epochs_run": epoch}',
        tests=[
            T + "test_resume_and_faults.py::"
            "test_resumed_and_restarted_run_ends_where_one_process_on_the_union_ends"
        ],
    ),
    dict(
        name="03-no-snapshot-broadcast",
        why="the snapshot not broadcast from rank 0: every rank resumes from its own disk",
        file="03_multigpu_torchrun.py",
        find="        dist.broadcast_object_list(snapshot, src=0)",
        replace="        snapshot = [torch.load(self.snapshot_path, weights_only=True)"
        " if os.path.exists(self.snapshot_path) else None]",
        tests=[
            T + "test_resume_and_faults.py::"
            "test_two_nodes_resume_from_rank_0s_snapshot_and_restart_together"
        ],
    ),
    # ---- step 04 ---------------------------------------------------------------------------------
    dict(
        name="04-ring-chunk",
        why="the ring all-reduce's all-gather sends the chunk one before the finished one",
        file="04_collectives_intro.py",
        find="ring_exchange(chunks[(r + 1 - step) % n], chunks[(r - step) % n])",
        replace="ring_exchange(chunks[(r - step) % n], chunks[(r - 1 - step) % n])",
        tests=[T + "test_04_collectives.py::test_ring_all_reduce_steps"],
    ),
    # ---- step 05 ---------------------------------------------------------------------------------
    dict(
        name="05-no-set-epoch",
        why="sampler.set_epoch deleted",
        file="05_singlenode_cpu.py",
        find="        self.train_data.sampler.set_epoch(epoch)",
        replace="        pass",
        tests=[
            T
            + "test_05_cpu_cluster.py::test_ranks_and_losses_are_those_of_one_process_on_the_union"
        ],
    ),
    dict(
        name="05-val-loss-not-reduced",
        why="the validation loss not all-reduced: rank 0's share only",
        file="05_singlenode_cpu.py",
        find="        dist.all_reduce(totals)",
        replace="        pass",
        tests=[
            T
            + "test_05_cpu_cluster.py::test_ranks_and_losses_are_those_of_one_process_on_the_union"
        ],
    ),
    # (05's best_val_loss not restored on resume: the best-model bookkeeping left step 05 in
    # 33faba0)
    # ---- step 06 ---------------------------------------------------------------------------------
    dict(
        name="06-no-set-epoch",
        why="sampler.set_epoch deleted",
        file="06_amp.py",
        find="        self.train_data.sampler.set_epoch(epoch)",
        replace="        pass",
        tests=[T + "test_06_amp.py::test_fp32_is_step_05_exactly"],
    ),
    dict(
        name="06-no-unscale",
        why="scaler.unscale_ deleted: clipping acts on the scaled gradients",
        file="06_amp.py",
        find="        self.scaler.unscale_(self.optimizer)",
        replace="        pass",
        tests=[T + "test_06_amp.py::test_fp16_resumes_with_the_saved_scale_and_learns_like_fp32"],
    ),
    dict(
        name="06-scaler-not-restored",
        why="the GradScaler's state not restored on resume",
        file="06_amp.py",
        find='        self.scaler.load_state_dict(snapshot[0]["scaler"])',
        replace="        pass",
        tests=[T + "test_06_amp.py::test_the_scale_is_read_back_from_the_snapshot"],
    ),
]


def planted(mutant: dict, source: str) -> str:
    """The file's text with the mutant planted; SystemExit if its snippet is not there exactly once.
    """
    count = source.count(mutant["find"])
    if count != 1:
        raise SystemExit(
            f"mutant {mutant['name']}: its snippet is {'not' if count == 0 else f'{count} times'} "
            f"in {mutant['file']}; re-anchor it in tools/mutants.py:\n{mutant['find']}"
        )
    return source.replace(mutant["find"], mutant["replace"])


def scratch_copy() -> Path:
    """The tracked files, as they are in the working tree, in a new temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="ddp-steps-mutants-"))
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree stays deleted
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def pytest(root: Path, tests: list, log: Path, first_failure_ends: bool = True) -> tuple:
    """Run the tests in the scratch copy; (pytest's exit code, seconds). Output goes to `log`.
    first_failure_ends: one test at a time (-n 0; pytest-xdist would report -x's stop as an
    interruption, exit code 2), ending at the first failure; else as pytest.ini says."""
    start = time.perf_counter()
    done = proc.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *(["-n", "0", "-x"] if first_failure_ends else []),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={root / '.pytest-tmp'}",
            *tests,
        ],
        cwd=root,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=RUN_LIMIT_S,
        merge_output=True,
    )
    log.write_text(done.stdout)
    return (124 if done.timed_out else done.returncode), time.perf_counter() - start


def verdict(code: int) -> str:
    # pytest: 0 all passed, 1 a test failed; 2-5 interrupted, internal or usage error, nothing
    # collected
    return {0: "SURVIVED", 1: "killed", 124: "TIMEOUT"}.get(code, f"ERROR (pytest exit {code})")


def main():
    parser = argparse.ArgumentParser(
        description="Plant each lesson mutant and run the tests that " "claim to catch it."
    )
    parser.add_argument("--only", default=None, help="comma-separated mutant names")
    parser.add_argument("--check", action="store_true", help="only check the snippets, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and the logs")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="no unmutated run first (only right after make test passed)")
    args = parser.parse_args()
    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m["name"] for m in MUTANTS})
        if unknown:
            parser.error(
                f"unknown mutants {unknown}; known: {', '.join(m['name'] for m in MUTANTS)}"
            )
        mutants = [m for m in MUTANTS if m["name"] in wanted]
    for mutant in mutants:
        planted(mutant, (REPO / mutant["file"]).read_text())
    print(f"{len(mutants)} mutants, every snippet found once")
    if args.check:
        return

    root = scratch_copy()
    logs = root / ".mutant-logs"
    logs.mkdir()
    everything = sorted({t for m in mutants for t in m["tests"]})
    if not args.skip_baseline:
        code, seconds = pytest(root, everything, logs / "baseline.log", first_failure_ends=False)
        result = "passed" if code == 0 else verdict(code)
        print(f"baseline (unmutated, {len(everything)} tests): {result} in {seconds:.0f} s",
              flush=True)
        if code != 0:
            print((logs / "baseline.log").read_text()[-6000:])
            raise SystemExit("the tests fail without any mutant: fix that first (else a kill means "
                             "nothing)")

    rows = []
    for mutant in mutants:
        path = root / mutant["file"]
        original = path.read_text()
        if not mutant["tests"]:
            rows.append((mutant, "NO TEST", 0.0))
            continue
        path.write_text(planted(mutant, original))
        try:
            code, seconds = pytest(root, mutant["tests"], logs / f"{mutant['name']}.log")
        finally:
            path.write_text(original)
        rows.append((mutant, verdict(code), seconds))
        print(f"{mutant['name']}: {verdict(code)} ({seconds:.0f} s)", flush=True)

    print(
        "\n| mutant | file | what it breaks | tests run | result | s |\n|---|---|---|---|---|---|"
    )
    for mutant, result, seconds in rows:
        tests = ", ".join(t.split("::")[-1] for t in mutant["tests"]) or "-"
        print(
            f"| {mutant['name']} | {mutant['file']} | {mutant['why']} | {tests} | {result} | "
            f"{seconds:.0f} |"
        )
    if args.keep:
        print(f"\nscratch copy and logs: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    bad = [m["name"] for m, result, _ in rows if result != "killed"]
    if bad:
        raise SystemExit(f"not killed: {', '.join(bad)}")


if __name__ == "__main__":
    main()
