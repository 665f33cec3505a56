"""Step 05: DDP on CPU processes with a validation set.

Checked against an independent computation: the validation loss the ranks agree on must equal the
loss of the saved model on the whole validation set, computed here in one process.
"""
import json
import os
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, run, torchrun

SCRIPT = "05_singlenode_cpu.py"


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def step05():
    return load_script(SCRIPT)


def whole_set_loss(step05, state_dict, dataset_size):
    """MSE of a saved model over the whole validation set, in one process, no torch.distributed."""
    args = Namespace(dataset_size=dataset_size, val_fraction=0.1, lr=0.01)
    _, val_set, model, _ = step05.load_train_objs(args)
    model.load_state_dict(state_dict)
    inputs = torch.stack([val_set[i][0] for i in range(len(val_set))])
    targets = torch.stack([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        return F.mse_loss(model(inputs), targets).item()


@pytest.fixture(scope="module")
def eight_processes(tmp_path_factory):
    """The README's 8 processes (fine on a 2-core machine): 410 validation samples, which 8 ranks cannot
    share evenly."""
    tmp = tmp_path_factory.mktemp("step05_np8")
    proc = run(torchrun(8, SCRIPT, "--max_epochs", "3", "--snapshot_path", "snapshot_np8.pt", "--best_path",
                        "best_np8.pt", "--log_file", "05_np8.jsonl"), cwd=tmp, timeout=300)
    return tmp, proc.stdout, read_log(tmp / "05_np8.jsonl")


def test_validation_loss_is_the_whole_set_loss(step05, eight_processes):
    tmp, stdout, records = eight_processes
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(r["world_size"] == 8 for r in records)
    # the final snapshot holds the model that scored the last epoch's val_loss
    final = torch.load(tmp / "snapshot_np8.pt", weights_only=True)["model"]
    assert records[-1]["val_loss"] == pytest.approx(whole_set_loss(step05, final, 4096), rel=1e-5)
    # the best-validation checkpoint holds the model with the lowest val_loss
    best = min(records, key=lambda r: r["val_loss"])
    best_model = torch.load(tmp / "best_np8.pt", weights_only=True)
    assert best["best"] and best["val_loss"] == pytest.approx(whole_set_loss(step05, best_model, 4096), rel=1e-5)
    # the printed per-epoch line
    last = records[-1]
    assert (f"[cpu:0] Epoch 2 | Batchsize 32 | Steps {last['steps']} | train_loss:{last['train_loss']:.4f} "
            f"val_loss:{last['val_loss']:.4f}") in stdout.splitlines()
    assert last["val_loss"] < records[0]["val_loss"]  # it learns
    assert stdout.splitlines()[-1].startswith("[cpu:0] Finished training: 3 epochs | best val_loss:")


def test_oversubscription_is_reported(eight_processes):
    _, stdout, _ = eight_processes
    cores = len(os.sched_getaffinity(0))
    assert f"[cpu:0] this node: 8 processes x 1 thread(s) on {cores} usable core(s)" in stdout
    assert ("| oversubscribed: still correct, only slower" in stdout) == (8 > cores)


def test_split_is_the_same_on_every_rank(step05):
    """The split depends on nothing a rank could differ in (its seed, the global random state)."""
    splits = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        train, val, _, _ = step05.load_train_objs(Namespace(dataset_size=1030, val_fraction=0.1, lr=0.01))
        splits.append((train.indices, val.indices))
    assert splits[0] == splits[1]
    train, val = splits[0]
    assert len(val) == 103 and sorted(train + val) == list(range(1030))


def test_resume_continues_exactly(tmp_path):
    """The README's 2 epochs, then the same command with --max_epochs 4 resumes from the snapshot:
    epochs 2-3 equal those of an uninterrupted 4-epoch run."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir(), part.mkdir()
    run(torchrun(2, SCRIPT, "--max_epochs", "4", "--log_file", "05.jsonl"), cwd=whole)
    run(torchrun(2, SCRIPT, "--max_epochs", "2", "--log_file", "05.jsonl"), cwd=part)
    proc = run(torchrun(2, SCRIPT, "--max_epochs", "4", "--log_file", "05.jsonl"), cwd=part)
    assert "[cpu:0] Resuming training from snapshot snapshot_05.pt at Epoch 2" in proc.stdout
    assert "[cpu:1] Resuming training from snapshot snapshot_05.pt at Epoch 2" in proc.stdout
    expected, resumed = read_log(whole / "05.jsonl"), read_log(part / "05.jsonl")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(expected, resumed):
        assert (a["train_loss"], a["val_loss"], a["best"]) == pytest.approx((b["train_loss"], b["val_loss"],
                                                                             b["best"]), rel=1e-6)
    # the resumed run knows the best val_loss so far: it only replaces best_05.pt with a better model
    assert torch.load(part / "snapshot_05.pt", weights_only=True)["best_val_loss"] == pytest.approx(
        min(r["val_loss"] for r in resumed), rel=1e-9)
