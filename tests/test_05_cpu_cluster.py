"""Step 05: CPU processes x threads on one node, the loss averaged over the ranks, and the
validation loss over the whole validation set, whatever the world size.

One run serves the tests: the README's command through tools/faults.py, with rank 1 crashing at
the start of epoch 1 and torchrun restarting both processes (they resume from the snapshot), and
411 validation samples, which 2 ranks share unevenly (206 and 205). Every rank's weights, every
epoch's loss and validation loss must be those of one process stepping on the union of the
ranks' batches, with the same clipping (tests/steptools.py). Measured: weights equal to 0 on
this machine, losses to 1e-7 relative (the steps add float32 losses on each rank); the bounds
are 1e-6 and 1e-5; the bugs below move them by 1e-3 or more.
"""
import json
import os
from argparse import Namespace

import pytest
import torch

import steptools
from conftest import exit_checked_env, load_script, run

README_COMMAND = "torchrun --standalone --nproc-per-node 2 05_singlenode_cpu.py --max_epochs 3"
SETTINGS = {"dataset_size": 4106}  # 411 validation samples: 206 on rank 0, 205 on rank 1
USABLE_CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def step05():
    return load_script("05_singlenode_cpu.py")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("step05")
    done = run(steptools.readme_command(
        README_COMMAND, ["--crash-at-epoch", 1, "--dump-ranks", "ranks"],
        ["--dataset_size", SETTINGS["dataset_size"], "--save_every", 1, "--log_file", "05.jsonl"],
        torchrun_options=["--max-restarts", 1]), cwd=folder, timeout=steptools.LAUNCH_TIMEOUT_S,
        env=exit_checked_env())  # no Gloo thread left at exit (conftest)
    records = [json.loads(line) for line in (folder / "05.jsonl").read_text().splitlines()]
    return folder, done.stdout, records


def test_ranks_and_losses_are_those_of_one_process_on_the_union(step05, readme_run):
    """Kills: set_epoch deleted, no DistributedSampler, the validation loss not all-reduced (rank
    0's share only), the training loss not all-reduced, epochs_run = epoch (epoch 0 logged twice,
    trained twice)."""
    folder, _, records = readme_run
    expected, reference = steptools.train_on_union(step05, world_size=2, epochs=3, clip=5.0,
                                                   **SETTINGS)
    for rank in (0, 1):
        weights = torch.load(folder / "ranks" / f"rank{rank}.pt", weights_only=True)["model"]
        assert steptools.max_difference(weights, expected) <= 1e-6, f"rank {rank}"
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epoch 0 before the crash, 1-2 after it
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["epoch"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5), got["epoch"]
    assert records[-1]["val_loss"] < records[0]["val_loss"] / 3  # and it learns


def test_output_lines(readme_run):
    _, stdout, records = readme_run
    lines = stdout.splitlines()
    threads = max(1, USABLE_CORES // 2)
    assert (f"[cpu rank 0] this node: 2 processes x {threads} thread(s) on {USABLE_CORES} usable "
            f"core(s)") in lines
    last = records[-1]
    assert (f"[cpu rank 0] Epoch 2 | Batchsize 32 | Steps {last['steps']} | loss "
            f"{last['loss']:.4f} | val loss {last['val_loss']:.4f}") in lines
    assert not any(line.startswith("[cpu rank 1] Epoch") for line in lines)  # the same numbers
    assert "[cpu rank 1] Resuming from snapshot_05.pt at Epoch 1" in lines


@pytest.mark.parametrize("wanted,processes,cores,expected", [
    (None, 2, 2, 1), (None, 1, 2, 2), (None, 8, 2, 1), (None, 4, 64, 16), (3, 2, 2, 3)])
def test_threads_per_process(step05, monkeypatch, wanted, processes, cores, expected):
    """--threads wins; else the usable cores shared out, at least 1 (oversubscribed below that)."""
    monkeypatch.setattr(step05, "USABLE_CORES", cores)
    assert step05.threads_per_process(wanted, processes) == expected


def test_split_is_the_same_on_every_rank(step05):
    """The split depends on nothing a rank could differ in (its seed, the global random state)."""
    splits = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        train, val, _, _ = step05.load_train_objs(Namespace(dataset_size=1030, val_fraction=0.1,
                                                            lr=0.01))
        splits.append((train.indices, val.indices))
    assert splits[0] == splits[1]
    train, val = splits[0]
    assert len(val) == 103 and sorted(train + val) == list(range(1030))
