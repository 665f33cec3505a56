"""Step 02: DDP on N processes trains exactly like one process stepping on the union of their
batches (tests/steptools.py computes that one process).

The N-process run is the README's command (python, mp.spawn, Gloo), started through
tools/faults.py --dump-ranks, which saves every rank's final weights: all copies are compared,
not only the checkpoint rank 0 writes. Measured on this machine: every rank's weights equal the
reference bit for bit (2 ranks: DDP's sum of two gradients divided by 2 rounds as the mean does).
The bound, 1e-6, leaves room for another summation order elsewhere; the bugs this test is for
move the weights by 1e-3 or more (see each assert).
"""
import json

import pytest
import torch

import steptools
from conftest import exit_checked_env, load_script, run

README_COMMAND = "python 02_multigpu_mp_spawn.py --max_epochs 4"
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def step02():
    return load_script("02_multigpu_mp_spawn.py")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's command, with every rank's final state kept: (folder, stdout)."""
    folder = tmp_path_factory.mktemp("step02")
    done = run(steptools.readme_command(README_COMMAND, ["--dump-ranks", "ranks"],
                                        ["--log_file", "02.jsonl"]), cwd=folder,
               timeout=steptools.LAUNCH_TIMEOUT_S, env=exit_checked_env())  # no Gloo thread at exit
    return folder, done.stdout


def test_every_rank_ends_where_one_process_on_the_union_ends(step02, readme_run):
    """Kills: set_epoch deleted (every epoch the same split), no DistributedSampler (each rank
    trains on all the data), a learning rate that depends on the rank (ranks >= 1 drift off)."""
    folder, _ = readme_run
    expected, records = steptools.train_on_union(step02, world_size=2, epochs=4)
    for rank in (0, 1):
        weights = torch.load(folder / "ranks" / f"rank{rank}.pt", weights_only=True)["model"]
        assert steptools.max_difference(weights, expected) <= TOLERANCE, f"rank {rank}"
    # The file rank 0 saved holds the model without DDP's wrapper: it loads into a plain model.
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    _, model, _ = step02.load_train_objs(step02.parse_args([]))
    model.load_state_dict(checkpoint)
    assert steptools.max_difference(checkpoint, expected) <= TOLERANCE
    # Rank 0 logs its own loss: the mean over its own batches.
    logged = [json.loads(line) for line in (folder / "02.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1, 2, 3]
    assert all(r["world_size"] == 2 and r["steps"] == 64 for r in logged)
    for got, want in zip(logged, records):
        assert got["loss"] == pytest.approx(want["loss_rank0"], rel=1e-5)


def test_output_lines(readme_run):
    _, stdout = readme_run
    lines = stdout.splitlines()
    for rank in (0, 1):  # every line says which process it comes from
        assert f"[cpu rank {rank}] device cpu | backend gloo | world_size 2 | GPUs here 0" in lines
        assert f"[cpu rank {rank}] Finished training: 4 epochs" in lines
        epochs = sum(line.startswith(f"[cpu rank {rank}] Epoch ") for line in lines)
        assert epochs == 4 + (rank == 0)  # rank 0 also says it saved
    assert "[cpu rank 0] Epoch 3 | Training checkpoint saved at checkpoint.pt" in lines
    assert not any(line.startswith("[cpu rank 1]") and "saved" in line for line in lines)
