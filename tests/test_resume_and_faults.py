"""Step 03: snapshots, resume, fault tolerance and multi-node, with real torchrun runs on CPU."""
import os
import sys

import pytest
import torch

from conftest import REPO, cpu_env, free_port, run, start_nodes, torchrun

STEP03 = "03_multigpu_torchrun.py"
SMALL = ["--dataset_size", "256", "--batch_size", "16", "--save_every", "1"]


FAULTS = "tools/faults.py"  # injects the crash from outside: the lesson has no demo hooks


def train(tmp_path, snapshot, max_epochs, nproc=2, env=None, extra=(), fault=(), check=True, standalone=True):
    script = [FAULTS, *fault, STEP03] if fault else [STEP03]
    cmd = torchrun(nproc, *script, *SMALL, "--max_epochs", max_epochs, "--snapshot_path", snapshot, extra=extra,
                   standalone=standalone)
    return run(cmd, cwd=tmp_path, env=env, check=check)


def load(path):
    return torch.load(path, weights_only=True)


def assert_identical(a, b):
    """Bit for bit: every model tensor and every optimizer buffer, and the epoch count."""
    assert a["epochs_run"] == b["epochs_run"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 epochs in one go: the run every interrupted run must end identical to."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = train(tmp, tmp / "snapshot.pt", 4)
    assert "Finished training: 4 epochs" in proc.stdout
    assert "Resuming" not in proc.stdout
    return load(tmp / "snapshot.pt")


def test_stopped_and_resumed_run_is_bit_identical(tmp_path, uninterrupted):
    snapshot = tmp_path / "snapshot.pt"
    train(tmp_path, snapshot, 2)
    assert load(snapshot)["epochs_run"] == 2
    proc = train(tmp_path, snapshot, 4)
    assert f"Resuming training from snapshot {snapshot} at Epoch 2" in proc.stdout
    assert "Epoch 1 |" not in proc.stdout  # epochs 0 and 1 are not trained again
    assert_identical(load(snapshot), uninterrupted)


@pytest.mark.parametrize("rendezvous", ["standalone", "c10d"])
def test_crashed_rank_is_restarted_and_resumes(tmp_path, uninterrupted, rendezvous):
    """torchrun restarts both processes; they rendezvous again and resume, with --standalone and with a c10d
    endpoint. The processes meet in the agent's key-value store, which outlives the attempt (pytorch/pytorch#135712);
    the step keeps each attempt's keys apart (store_for_this_attempt at the end of the file)."""
    snapshot = tmp_path / "snapshot.pt"
    extra = ["--max-restarts", "1"]
    if rendezvous == "c10d":
        extra += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--nnodes", "1"]
    proc = train(tmp_path, snapshot, 4, extra=extra, fault=["--crash-at-epoch", 2, "--rank", 1],
                 standalone=rendezvous == "standalone")
    output = proc.stdout + proc.stderr
    assert "simulated crash of rank 1 at epoch 2" in output
    assert f"Resuming training from snapshot {snapshot} at Epoch 2" in proc.stdout
    assert "Finished training: 4 epochs" in proc.stdout
    assert_identical(load(snapshot), uninterrupted)


def test_crash_without_restarts_fails_loudly(tmp_path):
    proc = train(tmp_path, "snapshot.pt", 3, extra=["--max-restarts", "0"], fault=["--crash-at-epoch", 1],
                 check=False)
    assert proc.returncode != 0
    assert "simulated crash" in proc.stdout + proc.stderr
    assert load(tmp_path / "snapshot.pt")["epochs_run"] == 1  # what was saved before the crash survives


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_snapshot_gives_clear_error(tmp_path, damage):
    snapshot = tmp_path / "snapshot.pt"
    train(tmp_path, snapshot, 1, nproc=1)
    data = snapshot.read_bytes()
    snapshot.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a snapshot at all")
    proc = run(torchrun(1, STEP03, *SMALL, "--max_epochs", 2, "--snapshot_path", snapshot),
               cwd=tmp_path, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: cannot resume from snapshot" in line]
    assert errors and str(snapshot) in errors[0] and "corrupt" in errors[0], proc.stderr[-2000:]


def test_crash_while_writing_keeps_previous_snapshot(tmp_path):
    snapshot = tmp_path / "snapshot.pt"
    train(tmp_path, snapshot, 1, nproc=1)
    before = load(snapshot)
    env = cpu_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1,
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    proc = run([sys.executable, REPO / FAULTS, "--die-while-saving", STEP03, *SMALL, "--max_epochs", 3,
                "--snapshot_path", snapshot], cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]  # it really died inside the save
    assert any(name.startswith("snapshot.pt.tmp.") for name in os.listdir(tmp_path))  # the half-written file
    assert_identical(load(snapshot), before)  # ... while the previous snapshot is untouched
    proc = train(tmp_path, snapshot, 2, nproc=1)  # and a rerun resumes from it
    assert f"Resuming training from snapshot {snapshot} at Epoch 1" in proc.stdout


def two_nodes(workdirs, args, max_restarts=0) -> str:
    """Two torchrun 'nodes' of one process each (tests/conftest.py start_nodes); both must succeed: their output."""
    procs = start_nodes(workdirs, args, extra=["--max-restarts", max_restarts])
    assert [p.returncode for p in procs] == [0, 0], [p.stdout + p.stderr for p in procs]
    return "".join(p.stdout + p.stderr for p in procs)


def test_two_nodes_restart_after_a_crash_and_resume(tmp_path, uninterrupted):
    """Rank 1 crashes at epoch 2 (once: --once-file on the disk both nodes share); torchrun restarts the processes
    of both nodes, which meet again and resume from the snapshot. torchrun counts the restart only on the node
    whose process failed, so a store prefix from TORCHELASTIC_RESTART_COUNT would put the two nodes' processes in
    different key spaces and they would never meet (the timeout of 1 minute would end it); the steps count each
    rank's starts in the store itself."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    snapshot = tmp_path / "snapshot.pt"  # one shared disk, as on a cluster
    everything = two_nodes(nodes, [FAULTS, "--crash-at-epoch", 2, "--rank", 1, "--once-file", tmp_path / "crashed",
                                   STEP03, *SMALL, "--max_epochs", 4, "--snapshot_path", snapshot,
                                   "--timeout_min", 1], max_restarts=1)
    assert "simulated crash of rank 1 at epoch 2" in everything
    assert f"Resuming training from snapshot {snapshot} at Epoch 2" in everything
    assert "Finished training: 4 epochs" in everything
    assert_identical(load(snapshot), uninterrupted)


def test_two_nodes_resume_from_rank_0s_snapshot(tmp_path, uninterrupted):
    """Two torchrun 'nodes' (one process each, own folder as own disk) meet through c10d rendezvous on 127.0.0.1.
    Their disks hold different snapshots (epoch 2 and epoch 1): both ranks resume from rank 0's, and the run ends
    bit-identical to the uninterrupted one. Only global rank 0 saves."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, epochs in zip(nodes, (2, 1)):
        node.mkdir()
        train(node, "snapshot.pt", epochs)
    everything = two_nodes(nodes, [STEP03, *SMALL, "--max_epochs", 4, "--snapshot_path", "snapshot.pt"])
    assert "world_size 2" in everything
    for rank in (0, 1):
        assert f"[cpu:{rank}] Resuming training from snapshot snapshot.pt at Epoch 2" in everything
        assert f"[cpu:{rank}] Epoch 3 |" in everything and f"[cpu:{rank}] Epoch 1 |" not in everything
    assert_identical(load(nodes[0] / "snapshot.pt"), uninterrupted)
    assert load(nodes[1] / "snapshot.pt")["epochs_run"] == 1  # rank 1 never saves: its old file is untouched
