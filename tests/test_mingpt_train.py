"""minGPT-ddp end to end, as a learner runs it: real processes, real gloo groups.

A tiny model (2 layers, 32 wide) on the default corpus (Python's own sources: no
download) trains a few dozen steps in seconds on one CPU core per rank.
"""
import json
import shutil
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT, aborted_only_at_exit, free_port, run, start_nodes, torchrun

MAIN = REPO / "minGPT-ddp" / "main.py"
SAMPLE = REPO / "minGPT-ddp" / "sample.py"
TINY = ["config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml"), *TINY_GPT, "trainer.learning_rate=3e-3"]


def outputs(tmp_path, name):
    return [f"trainer.snapshot_path={tmp_path / (name + '.pt')}", f"trainer.log_file={tmp_path / (name + '.jsonl')}"]


def records(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def val_losses(tmp_path, name):
    return {r["iter"]: r["val_loss"] for r in records(tmp_path, name) if "val_loss" in r}


def train_losses(tmp_path, name):
    return {r["iter"]: r["loss"] for r in records(tmp_path, name) if "loss" in r}


@pytest.fixture(scope="module")
def ddp_and_accumulation(tmp_path_factory):
    """The same 30 steps twice, dropout 0: 2 ranks x 2 micro-steps x 8 sequences (DDP skips the all-reduce
    on the first micro-step), and 1 process x 4 micro-steps x 8 sequences."""
    tmp_path = tmp_path_factory.mktemp("mingpt")
    two_ranks = run(torchrun(2, "minGPT-ddp/main.py", *TINY, "trainer.max_iters=30", "trainer.grad_accum_steps=2",
                             *outputs(tmp_path, "ddp")), cwd=tmp_path)
    one_rank = run([sys.executable, MAIN, *TINY, "trainer.max_iters=30", "trainer.grad_accum_steps=4",
                    *outputs(tmp_path, "accum")], cwd=tmp_path)
    return tmp_path, two_ranks, one_rank


def test_two_ranks_train_and_loss_falls(ddp_and_accumulation):
    tmp_path, two_ranks, _ = ddp_and_accumulation
    assert "[cpu:0] device cpu | backend gloo | world_size 2" in two_ranks.stdout
    assert "Finished training" in two_ranks.stdout
    val = val_losses(tmp_path, "ddp")
    assert sorted(val) == [0, 10, 20, 30]
    assert val[30] < val[0] - 0.5, val


def test_two_ranks_match_one_rank_with_the_same_global_batch(ddp_and_accumulation):
    """2 ranks x 2 accumulation steps = 1 rank x 4: the same 32 sequences per step, the same mean gradient.
    Only the order of float32 sums differs, by a few ulps, and training amplifies that: the largest weight
    difference measured 8e-9 after 3 steps, 1e-7 after 10, 6e-5 after 30. So losses within 2e-4 and weights
    within 5e-4; a wrong batch or a wrong scale of the gradient moves weights by up to the learning rate
    (3e-3) per step."""
    tmp_path, _, one_rank = ddp_and_accumulation
    assert "world_size 1" in one_rank.stdout and "x 4 micro-steps x 1 ranks" in one_rank.stdout
    assert val_losses(tmp_path, "ddp") == pytest.approx(val_losses(tmp_path, "accum"), abs=2e-4)
    assert train_losses(tmp_path, "ddp") == pytest.approx(train_losses(tmp_path, "accum"), abs=2e-4)
    two, one = (torch.load(tmp_path / f"{name}.pt", weights_only=True)["model"] for name in ("ddp", "accum"))
    assert max((two[k] - one[k]).abs().max().item() for k in two) < 5e-4


def test_every_rank_has_the_same_data_and_validation_loss_is_averaged(ddp_and_accumulation):
    tmp_path, two_ranks, _ = ddp_and_accumulation
    data_lines = {line.split()[0]: line.split("fingerprint ")[1] for line in two_ranks.stdout.splitlines()
                  if " data " in line}
    assert set(data_lines) == {"[cpu:0]", "[cpu:1]"}
    assert data_lines["[cpu:0]"] == data_lines["[cpu:1]"]
    # The 4 validation batches are split 2 + 2 between the ranks. Only the average over both
    # ranks equals the 1-process loss over all 4, before any training (iter 0) and after.
    assert val_losses(tmp_path, "ddp")[0] == pytest.approx(val_losses(tmp_path, "accum")[0], abs=1e-5)


def test_one_process_trains_resumes_identically_and_samples(tmp_path):
    # dropout on: the resumed half must also draw the same dropout masks
    args = [*TINY, "model.dropout=0.1", "trainer.lr_decay_iters=20", "trainer.eval_interval=5"]
    straight = run([sys.executable, MAIN, *args, "trainer.max_iters=20", *outputs(tmp_path, "straight")],
                   cwd=tmp_path)
    assert "backend none (one process) | world_size 1" in straight.stdout
    straight_val = val_losses(tmp_path, "straight")
    assert straight_val[20] < straight_val[0] - 0.3

    run([sys.executable, MAIN, *args, "trainer.max_iters=10", *outputs(tmp_path, "halves")], cwd=tmp_path)
    again = run([sys.executable, MAIN, *args, "trainer.max_iters=10", "trainer.resume=true",
                 *outputs(tmp_path, "halves")], cwd=tmp_path, check=False)
    assert again.returncode != 0 and "nothing to train" in again.stderr  # never exits 0 without training
    resumed = run([sys.executable, MAIN, *args, "trainer.max_iters=20", "trainer.resume=true",
                   *outputs(tmp_path, "halves")], cwd=tmp_path)
    assert "resuming from" in resumed.stdout
    assert val_losses(tmp_path, "halves") == pytest.approx(straight_val, abs=1e-6)
    assert train_losses(tmp_path, "halves") == pytest.approx(train_losses(tmp_path, "straight"), abs=1e-6)

    sample = run([sys.executable, SAMPLE, "--snapshot", tmp_path / "halves.pt", "--prompt", "def ",
                  "--max-new-tokens", "50"], cwd=tmp_path)
    header, text = sample.stdout.split("\n", 1)
    assert "step 20" in header
    assert text.startswith("def ") and len(text.rstrip("\n")) >= 40


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["trainer.max_iter=5"], "error: unknown config key 'trainer.max_iter'"),
    (["trainer.max_iters=many"], "error: bad value for config key trainer.max_iters"),
    (["data.path=no_such_file.txt"], "error: data file no_such_file.txt not found"),
    (["trainer.resume=true"], "error: snapshot"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    proc = run([sys.executable, MAIN, *TINY, *outputs(tmp_path, "bad"), *args], cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert line.startswith(expected)
    if "unknown" in line:
        assert "trainer.max_iters" in line  # the valid keys are listed


def test_float16_cannot_resume_a_float32_snapshot(ddp_and_accumulation, tmp_path):
    """A float32 run has no gradient-scaler state for float16 to continue with: one line, exit code 2."""
    shutil.copy(ddp_and_accumulation[0] / "accum.pt", tmp_path / "fp32.pt")
    proc = run([sys.executable, MAIN, *TINY, "trainer.max_iters=40", "trainer.resume=true", "trainer.dtype=float16",
                *outputs(tmp_path, "fp32")], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith(f"error: trainer.dtype=float16 cannot resume snapshot {tmp_path / 'fp32.pt'}: "
                           "it was trained with trainer.dtype=float32")
    assert "resume with trainer.dtype=float32 or bfloat16" in proc.stderr


def two_nodes(tmp_path, snapshots: dict, *args, timeout=150):
    """Two torchrun "nodes" on this machine (tests/conftest.py start_nodes: one rank each), each in its own
    folder with its own disk's view: snapshots maps folder name -> snapshot file to put at node.pt there."""
    folders = []
    for name, source in snapshots.items():
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        if source is not None:
            shutil.copy(source, folders[-1] / "node.pt")
    procs = start_nodes(folders, ["minGPT-ddp/main.py", *TINY, *args, "trainer.snapshot_path=node.pt",
                                  "trainer.log_file=node.jsonl", "trainer.timeout_minutes=0.5"], timeout=timeout)
    return dict(zip(snapshots, procs))


def test_nodes_with_different_snapshots_stop_in_one_line(ddp_and_accumulation, tmp_path):
    """Each node's disk holds another snapshot (both at step 30, different runs): resuming would train
    the ranks from different points and diverge silently; every rank stops instead, saying why."""
    folder = ddp_and_accumulation[0]
    results = two_nodes(tmp_path, {"a": folder / "ddp.pt", "b": folder / "accum.pt"}, "trainer.max_iters=40",
                        "trainer.resume=auto")
    for name, proc in results.items():
        assert proc.returncode != 0, name
        errors = [line for line in proc.stderr.splitlines() if " error: " in line]
        assert len(errors) == 1, (name, proc.stderr)
        assert "error: the nodes see different snapshots at node.pt (rank 0: step 30, sha256 " in errors[0]
        assert "rank 1: step 30, sha256 " in errors[0]
        assert "iter " not in proc.stdout and not (tmp_path / name / "node.jsonl").exists()


def test_nodes_with_the_same_snapshot_resume_together(ddp_and_accumulation, tmp_path):
    snapshot = ddp_and_accumulation[0] / "ddp.pt"
    results = two_nodes(tmp_path, {"a": snapshot, "b": snapshot}, "trainer.max_iters=35", "trainer.resume=auto",
                        "trainer.lr_decay_iters=30", "trainer.grad_accum_steps=2")
    for name, proc in results.items():  # (or the Gloo exit abort after the run: see conftest.EXIT_ABORT)
        assert proc.returncode == 0 or aborted_only_at_exit(proc), (name, proc.stderr[-3000:])
    stdout = "".join(proc.stdout for proc in results.values())
    assert "resuming from node.pt at step 30" in stdout and "Finished training: steps 30-35" in stdout


def test_corrupt_snapshot_is_one_clear_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a snapshot, half a file")
    proc = run([sys.executable, MAIN, *TINY, *outputs(tmp_path, "bad"), "trainer.resume=true"],
               cwd=tmp_path, check=False)
    assert one_error_line(proc).startswith("error: cannot read snapshot")
    proc = run([sys.executable, SAMPLE, "--snapshot", tmp_path / "bad.pt"], cwd=tmp_path, check=False)
    assert one_error_line(proc).startswith("error: cannot read snapshot")


@pytest.mark.parametrize("script", ["main.py", "sample.py", "bench.py", "prepare.py"])
def test_help(tmp_path, script):
    proc = run([sys.executable, REPO / "minGPT-ddp" / script, "--help"], cwd=tmp_path)
    assert proc.stdout.startswith("usage:")


def test_prepare_fails_clearly_when_the_download_fails(tmp_path):
    out = tmp_path / "shakespeare.txt"
    proc = run([sys.executable, REPO / "minGPT-ddp" / "prepare.py", "--out", out,
                "--url", f"http://127.0.0.1:{free_port()}/input.txt"], cwd=tmp_path, check=False)
    assert one_error_line(proc).startswith("error: cannot download")
    assert not out.exists()


def test_bench_reports_weak_scaling(tmp_path):
    proc = run([sys.executable, REPO / "minGPT-ddp" / "bench.py", "--weak-scaling", "--nproc", "2",
                "--iters", "6", "--warmup", "2", "--windows", "2", *TINY], cwd=tmp_path)
    result = json.loads(proc.stdout.splitlines()[-1].removeprefix("BENCH_RESULT "))
    assert result["one_rank"]["world_size"] == 1 and result["n_ranks"]["world_size"] == 2
    assert result["n_ranks"]["tokens_per_step"] == 2 * result["one_rank"]["tokens_per_step"]
    assert result["efficiency"] > 0 and 0 < result["one_rank"]["mfu"] < 1
    assert "efficiency" in proc.stdout
