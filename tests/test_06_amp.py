"""Step 06: autocast + GradScaler on top of step 05.

The bf16 run must follow the fp32 run closely (but not identically: autocast really changes the
arithmetic), and GradScaler must skip a step whose gradients overflowed, on every rank, instead of
writing inf/NaN into the weights.
"""
import json
import math
import sys

import pytest
import torch

from conftest import REPO, cpu_env, run, torchrun

SCRIPT = "06_amp.py"
# bf16 keeps 8 bits of mantissa: losses of the toy regression stay within this relative distance of fp32's.
BF16_REL_TOLERANCE = 0.10


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_06(tmp_path, dtype, *args, nproc=2, env=None, fault=()):
    """`torchrun --standalone --nproc-per-node 2 06_amp.py --dtype D ...` in its own folder, with a JSON log;
    with a fault, tools/faults.py injects it from outside."""
    folder = tmp_path / (dtype or "default")
    folder.mkdir()
    dtype_args = ["--dtype", dtype] if dtype else []
    log = f"{dtype or 'default'}.jsonl"
    script = ["tools/faults.py", *fault, SCRIPT] if fault else [SCRIPT]
    proc = run(torchrun(nproc, *script, *dtype_args, *args, "--log_file", log), cwd=folder, env=env)
    return proc.stdout, read_log(folder / log), folder


def test_bf16_tracks_fp32(tmp_path):
    out32, fp32, _ = run_06(tmp_path, "fp32", "--max_epochs", "5")
    out16, bf16, _ = run_06(tmp_path, "bf16", "--max_epochs", "5")
    assert "[cpu:0] precision: fp32, autocast off" in out32
    assert "[cpu:0] precision: autocast bfloat16 | GradScaler off (not needed)" in out16
    assert [r["dtype"] for r in fp32] == ["fp32"] * 5 and [r["dtype"] for r in bf16] == ["bf16"] * 5
    for a, b in zip(fp32, bf16):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=BF16_REL_TOLERANCE), (a["epoch"], key, a[key], b[key])
    assert [r["val_loss"] for r in bf16] != [r["val_loss"] for r in fp32]  # autocast did change the arithmetic
    assert bf16[-1]["val_loss"] < bf16[0]["val_loss"] / 3  # and it learns
    for out, records, name in ((out32, fp32, "fp32"), (out16, bf16, "bf16")):
        last = records[-1]
        assert (f"[cpu:0] Epoch 4 | Batchsize 32 | Steps {last['steps']} | train_loss:{last['train_loss']:.4f} "
                f"val_loss:{last['val_loss']:.4f} | {last['epoch_time_s']:.3f} s") in out.splitlines()
        assert out.splitlines()[-1] == (
            f"[cpu:0] Finished training: 5 epochs | dtype {name} | "
            f"best val_loss:{min(r['val_loss'] for r in records):.4f} saved at best_06_{name}.pt")


def check_skipped_step(stdout, records, folder, step):
    """The injected step changed no weight, halved the scale, and training went on with finite losses
    (had the step been taken, inf/NaN gradients would have made every later loss NaN)."""
    (line,) = [line for line in stdout.splitlines() if f"Step {step} | inf injected" in line]
    assert "| weights changed: False |" in line and line.endswith("GradScaler skipped the step on this rank")
    before, after = (float(x) for x in line.split("| scale ")[1].split(" |")[0].split(" -> "))
    assert after == before / 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)
    assert records[-1]["scale"] == after  # nothing overflowed after the injection (growth needs 2000 steps)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    # the scaler's state travels in the snapshot, so a resumed run goes on with the same scale
    snapshot = torch.load(folder / "snapshot_06_fp16.pt", weights_only=True)
    assert snapshot["scaler"]["scale"] == after


def test_grad_scaler_skips_an_overflowing_step_on_cpu(tmp_path):
    """fp16 on the CPU runs with torch's CPU GradScaler. Step 70 (in epoch 1): rank 1's loss becomes inf; the
    gradient all-reduce spreads the inf to rank 0 as well, so every rank skips that step."""
    stdout, records, folder = run_06(tmp_path, "fp16", "--max_epochs", "2", fault=["--inf-at-step", 70])
    assert "[cpu:0] precision: autocast float16 | GradScaler on" in stdout
    check_skipped_step(stdout, records, folder, 70)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_scaler_skips_an_overflowing_step_on_cuda(tmp_path):
    """The GPU path with fp16 and GradScaler, NCCL, one process per GPU (one GPU is enough)."""
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    stdout, records, folder = run_06(tmp_path, "fp16", "--max_epochs", "2", nproc=1, env=env,
                                     fault=["--inf-at-step", 70, "--rank", 0])
    assert stdout.splitlines()[0].startswith("[cuda:0] device cuda | backend nccl | world_size 1")
    assert "[cuda:0] precision: autocast float16 | GradScaler on" in stdout
    check_skipped_step(stdout, records, folder, 70)


def test_bad_dtype(tmp_path):
    proc = run([sys.executable, REPO / SCRIPT, "--dtype", "fp8"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "argument --dtype: invalid choice: 'fp8'" in proc.stderr.splitlines()[-1]
