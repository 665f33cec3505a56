"""Step 03: snapshots, resume, a crash that torchrun restarts, several nodes: real torchrun runs.

One chain of runs serves every test (starting processes is what costs time):
1. the README's first command: 2 epochs, a snapshot after each (copies kept by tools/faults.py);
2. the README's second command: it resumes from that snapshot at epoch 2; rank 1 crashes at the
   start of epoch 3; torchrun restarts both processes, which resume from the snapshot at epoch 3;
3. two torchrun "nodes" on loopback (c10d), whose disks hold different snapshots (epoch 2 on one,
   epoch 1 on the other), with a crash and a restart on top.
Runs 2 and 3 must end where step 02's reference ends (tests/steptools.py: one process on the
union of the batches) and bit for bit where each other ends.
"""
import json
import os
import sys
import shutil
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import steptools
from conftest import exit_checked_env, load_script, run, start_nodes

README_FIRST = "torchrun --standalone --nproc-per-node 2 03_multigpu_torchrun.py --max_epochs 2 " \
               "--save_every 1"
README_CRASH = "torchrun --standalone --nproc-per-node 2 --max-restarts 1 tools/faults.py " \
               "--crash-at-epoch 3 03_multigpu_torchrun.py --max_epochs 4 --save_every 1"
TOLERANCE = 1e-6  # measured 0 (bit for bit) on this machine; see test_ddp_equivalence.py


@pytest.fixture(scope="module")
def step03():
    return load_script("03_multigpu_torchrun.py")


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """The README's two commands, one after the other in one folder: (folder, their stdouts)."""
    folder = tmp_path_factory.mktemp("step03")
    first = run(steptools.readme_command(README_FIRST, ["--keep-snapshots"]), cwd=folder,
                timeout=steptools.LAUNCH_TIMEOUT_S, env=exit_checked_env())  # no Gloo thread at exit
    crash = run(steptools.readme_command(README_CRASH, ["--dump-ranks", "ranks"]), cwd=folder,
                timeout=steptools.LAUNCH_TIMEOUT_S)
    return folder, first.stdout, crash.stdout + crash.stderr


def load(path):
    return torch.load(path, weights_only=True)


def assert_identical(a, b):
    """Bit for bit: every weight, every momentum buffer, the epoch count."""
    assert a["epochs_run"] == b["epochs_run"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"]), key


def test_resumed_and_restarted_run_ends_where_one_process_on_the_union_ends(step03, readme_runs):
    """Kills: set_epoch deleted, no DistributedSampler, epochs_run = epoch (the resumed run trains
    an epoch twice), the optimizer's momentum not restored."""
    folder, first, crash = readme_runs
    expected, _ = steptools.train_on_union(step03, world_size=2, epochs=4)
    final = load(folder / "snapshot.pt")
    assert final["epochs_run"] == 4
    assert steptools.max_difference(final["model"], expected) <= TOLERANCE
    for rank in (0, 1):  # every copy, not only the one rank 0 saved
        copy = load(folder / "ranks" / f"rank{rank}.pt")["model"]
        assert all(torch.equal(copy[k], final["model"][k]) for k in copy), f"rank {rank}"
    assert [load(folder / f"snapshot.pt.epochs{n}")["epochs_run"] for n in (1, 2)] == [1, 2]


def test_what_the_resumed_and_restarted_run_prints(readme_runs):
    _, first, crash = readme_runs
    assert "[cpu rank 1] Finished training: 2 epochs" in first.splitlines()
    lines = crash.splitlines()
    assert "[rank1]: RuntimeError: simulated crash of rank 1 at epoch 3 (tools/faults.py)" in lines
    for rank in (0, 1):
        for epoch in (2, 3):  # at the start, then after torchrun's restart
            assert f"[cpu rank {rank}] Resuming from snapshot.pt at Epoch {epoch}" in lines
        assert sum(line.startswith(f"[cpu rank {rank}] Epoch 2 | Batchsize") for line in lines) == 1
        assert not any(line.startswith(f"[cpu rank {rank}] Epoch 1 |") for line in lines)
        assert f"[cpu rank {rank}] Finished training: 4 epochs" in lines


def node_of_rank0(results):
    (node,) = [i for i, r in enumerate(results) if "[cpu rank 0] device" in r.stdout]
    return node


def test_two_nodes_resume_from_rank_0s_snapshot_and_restart_together(tmp_path, readme_runs):
    """Two torchrun "nodes" (one process each, a folder each as its own disk) meet through c10d on
    127.0.0.1. Which node gets rank 0 is not fixed: both ranks must resume from rank 0's snapshot,
    whichever that is. Rank 1 crashes at epoch 3 (once: --once-file on the disk both share);
    torchrun restarts the processes of both nodes, which meet again (the store prefix per attempt,
    plumbing.py) and resume. Kills: the snapshot not broadcast from rank 0."""
    folder = readme_runs[0]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, epochs in zip(nodes, (2, 1)):
        node.mkdir()
        shutil.copy(folder / f"snapshot.pt.epochs{epochs}", node / "snapshot.pt")
    results = start_nodes(nodes, ["tools/faults.py", "--crash-at-epoch", 3, "--rank", 1,
                                  "--once-file", tmp_path / "crashed", "03_multigpu_torchrun.py",
                                  "--max_epochs", 4, "--save_every", 1, "--timeout_min", 2],
                          extra=["--max-restarts", 1], timeout=steptools.LAUNCH_TIMEOUT_S)
    assert [r.returncode for r in results] == [0, 0], [r.stdout + r.stderr for r in results]
    everything = "".join(r.stdout + r.stderr for r in results)
    rank0_node = node_of_rank0(results)
    start = (2, 1)[rank0_node]  # the epochs in rank 0's snapshot
    assert "simulated crash of rank 1 at epoch 3" in everything
    for rank in (0, 1):
        for epoch in (start, 3):
            assert f"[cpu rank {rank}] Resuming from snapshot.pt at Epoch {epoch}" in everything
    assert_identical(load(nodes[rank0_node] / "snapshot.pt"), load(folder / "snapshot.pt"))
    other = nodes[1 - rank0_node] / "snapshot.pt"  # rank 1 never saves: its file is untouched
    assert load(other)["epochs_run"] == (2, 1)[1 - rank0_node]


def test_nodes_that_pick_different_backends_stop_in_one_line(tmp_path):
    """The node torchrun numbers 1 picks NCCL (tools/faults.py --other-backend), the other Gloo,
    as when one node has fewer GPUs than processes. Both stop at once with one line instead of
    waiting for each other until the timeout. Kills: no backend check (the Gloo side waits out
    its timeout, the other fails with another error)."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    results = start_nodes(nodes, ["tools/faults.py", "--other-backend", "nccl",
                                  "03_multigpu_torchrun.py", "--timeout_min", 1],
                          timeout=steptools.LAUNCH_TIMEOUT_S)
    for result in results:
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(
            "error: the nodes picked different backends (1 gloo, 1 nccl; this one "), errors
        assert not any(line.startswith("[rank") for line in result.stderr.splitlines())  # no trace
        assert "Epoch" not in result.stdout


# ---- In this process, with a process group of one rank: reading and writing snapshots ----------
@pytest.fixture(scope="module")
def one_rank(step03):
    """A Gloo process group of one rank in this process (no other process needed)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield lambda path: trainer(step03, path)
    dist.destroy_process_group()


def trainer(step, snapshot_path):
    """Step 03's Trainer, which reads the snapshot at `snapshot_path` if there is one."""
    dataset, model, optimizer = step.load_train_objs(Namespace(dataset_size=64, lr=0.01))
    data = DataLoader(dataset, batch_size=8)
    return step.Trainer(model, data, optimizer, torch.device("cpu"), 1, str(snapshot_path), None)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_snapshot_is_refused_in_one_line(tmp_path, readme_runs, one_rank, damage):
    good = (readme_runs[0] / "snapshot.pt.epochs1").read_bytes()
    path = tmp_path / "snapshot.pt"
    path.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"not a snapshot")
    with pytest.raises(SystemExit) as stop:
        one_rank(path)
    message = str(stop.value.code)
    assert message.startswith(f"error: cannot resume from snapshot {path}: it is corrupt or "
                              "truncated (") and message.endswith("; delete it to start afresh")
    assert "\n" not in message


def test_a_crash_while_saving_leaves_the_previous_snapshot(tmp_path, readme_runs, one_rank,
                                                          monkeypatch):
    """torch.save dies half-way (it writes half the bytes, then raises, as a process killed in
    the middle would stop): the snapshot from before is intact, the half file is a temporary one.
    Kills: saving straight to the snapshot's path."""
    path = tmp_path / "snapshot.pt"
    shutil.copy(readme_runs[0] / "snapshot.pt.epochs1", path)
    before = path.read_bytes()
    trainer = one_rank(path)
    assert trainer.epochs_run == 1
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_snapshot(1)
    assert path.read_bytes() == before
    assert [p.name.startswith("snapshot.pt.tmp.") for p in tmp_path.iterdir()].count(True) == 1
    os.remove(next(p for p in tmp_path.iterdir() if p.name.startswith("snapshot.pt.tmp.")))


def test_faults_puts_a_ranks_exception_into_torchruns_error_file(tmp_path, monkeypatch):
    """faults.py's main has @record: under torchrun (TORCHELASTIC_ERROR_FILE), a rank's exception
    lands in the error file torchrun's failure report reads. Kills: @record removed."""
    step = tmp_path / "failing_step.py"
    step.write_text("def parse_args(argv):\n    raise RuntimeError(f'bad arguments {argv}')\n")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(sys, "argv", ["faults.py", str(step), "--epochs", "2"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_step adds the step's folder
    monkeypatch.setitem(sys.modules, "step_under_test", None)  # load_step registers the step
    faults = load_script("tools/faults.py")
    with pytest.raises(RuntimeError, match="bad arguments"):
        faults.main()
    error = json.loads(error_file.read_text())["message"]
    assert error["message"] == "RuntimeError: bad arguments ['--epochs', '2']", error
    assert 'failing_step.py", line 2, in parse_args' in error["extraInfo"]["py_callstack"]
