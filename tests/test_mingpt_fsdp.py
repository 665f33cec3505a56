"""minGPT-ddp with trainer.strategy=fsdp (FSDP2, fully_shard): real gloo groups of 2 CPU processes.

FSDP must train the same model as DDP (same losses, same weights), with and without gradient
accumulation; its snapshots are ordinary whole-model files that resume under either strategy and
sample; it really holds half the AdamW state per rank on 2 ranks; bad combinations stop in one line.

Tolerance: FSDP and DDP do the same arithmetic in float32 except for the order of some sums. FSDP
reduce-scatters gradients shard by shard and computes the clipping norm from per-shard partial sums;
DDP all-reduces whole buckets and takes the norm over whole tensors. A different order of float32
additions changes a result in its last bits (1 ulp of a weight near 1.0 is 1.2e-7). After 20 steps
the largest weight difference measured is a few ulps; TOL = 1e-5 leaves room for 100 times that and
is still 100 times smaller than one step's update (learning rate 3e-3): a missing or doubled gradient
sync moves weights by 1e-3 or more, and test_tolerance_tells_runs_apart shows it does.
"""
import json
import shutil
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT, cpu_env, run, torchrun

MAIN = REPO / "minGPT-ddp" / "main.py"
SAMPLE = REPO / "minGPT-ddp" / "sample.py"
BENCH = REPO / "minGPT-ddp" / "bench.py"
TINY = ["config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml"), *TINY_GPT, "trainer.learning_rate=3e-3",
        "trainer.max_iters=20"]
TOL = 1e-5


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path):
    return {(r["iter"], key): r[key] for r in log(path) for key in ("loss", "val_loss") if key in r}


@pytest.fixture(scope="module")
def strategies(tmp_path_factory):
    """20 steps of the tiny GPT on 2 ranks, four times in one process group: DDP and FSDP, each with
    1 and 2 gradient-accumulation steps. Final snapshots in OUT/{ddp,fsdp}_{1,2}.pt."""
    out = tmp_path_factory.mktemp("strategies")
    proc = run(torchrun(2, "tests/workers/mingpt_strategies.py", out, "ddp:1", "fsdp:1", "ddp:2", "fsdp:2",
                        "--", *TINY), cwd=out)
    assert proc.stdout.count("finished at step 20") == 4, proc.stdout
    return out


@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_trains_the_same_model_as_ddp(strategies, accum):
    ddp, fsdp = strategies / f"ddp_{accum}", strategies / f"fsdp_{accum}"
    assert max_difference(weights(f"{ddp}.pt"), weights(f"{fsdp}.pt")) < TOL
    ddp_losses, fsdp_losses = losses(ddp.with_suffix(".jsonl")), losses(fsdp.with_suffix(".jsonl"))
    assert ddp_losses.keys() == fsdp_losses.keys() and (20, "val_loss") in ddp_losses
    assert fsdp_losses == pytest.approx(ddp_losses, abs=TOL)


def test_tolerance_tells_runs_apart(strategies):
    """Same data, but 1 micro-step of 8 sequences per rank or 2: the weights differ far beyond TOL."""
    assert max_difference(weights(strategies / "fsdp_1.pt"), weights(strategies / "fsdp_2.pt")) > 100 * TOL


def test_fsdp_snapshot_is_one_whole_model_file(strategies):
    state = torch.load(strategies / "fsdp_1.pt", map_location="cpu", weights_only=True)
    ddp_state = torch.load(strategies / "ddp_1.pt", map_location="cpu", weights_only=True)
    for name, tensor in state["model"].items():  # whole tensors under the model's names, as DDP saves them
        assert type(tensor) is torch.Tensor and tensor.shape == ddp_state["model"][name].shape, name
    assert state["optimizer"]["state"].keys() == ddp_state["optimizer"]["state"].keys()
    assert state["config"]["trainer"]["strategy"] == "fsdp" and state["step"] == 20


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """FSDP on 2 ranks, 20 steps, snapshots at 10 and 20; rank 1 crashes at step 15 (injected from outside,
    tests/workers/mingpt_faults.py); torchrun restarts both ranks, which resume from step 10."""
    out = tmp_path_factory.mktemp("crash")
    proc = run(torchrun(2, "tests/workers/mingpt_faults.py", "--crash-at-step", "15", "--keep-snapshots", *TINY,
                        "trainer.strategy=fsdp", "trainer.resume=auto", f"trainer.snapshot_path={out / 'run.pt'}",
                        f"trainer.log_file={out / 'run.jsonl'}", extra=["--max-restarts", "1"]), cwd=out)
    return out, proc


def test_fsdp_killed_and_resumed_matches_an_uninterrupted_run(crashed_and_resumed, strategies):
    out, proc = crashed_and_resumed
    assert "simulated crash of rank 1 at step 15" in proc.stderr
    assert f"resuming from {out / 'run.pt'} at step 10" in proc.stdout
    assert "Finished training: steps 10-20" in proc.stdout
    # Resuming restores every float32 bit (weights, AdamW moments, step): nothing of the first attempt is lost.
    assert max_difference(weights(out / "run.pt"), weights(strategies / "fsdp_1.pt")) == 0.0


def test_fsdp_snapshot_samples_and_resumes_under_ddp(crashed_and_resumed, strategies):
    out, _ = crashed_and_resumed
    sample = run([sys.executable, SAMPLE, "--snapshot", out / "run.pt.step10", "--prompt", "def ",
                  "--max-new-tokens", "20"], cwd=out)
    assert "step 10" in sample.stdout.splitlines()[0]
    shutil.copy(out / "run.pt.step10", out / "to_ddp.pt")
    proc = run(torchrun(2, "minGPT-ddp/main.py", *TINY, "trainer.strategy=ddp", "trainer.resume=true",
                        f"trainer.snapshot_path={out / 'to_ddp.pt'}", f"trainer.log_file={out / 'to_ddp.jsonl'}"),
               cwd=out)
    assert "strategy ddp" in proc.stdout and "at step 10" in proc.stdout
    assert max_difference(weights(out / "to_ddp.pt"), weights(strategies / "ddp_1.pt")) < TOL


def test_bench_fsdp_holds_half_the_state_per_rank(tmp_path):
    log_file = tmp_path / "bench.jsonl"
    proc = run([sys.executable, BENCH, "--memory", "2", "--iters", "1", "--warmup", "1", "--windows", "1",
                "--log_file", log_file, *TINY], cwd=tmp_path)
    results = {r["strategy"]: r for r in log(log_file)}
    assert sorted(results) == ["ddp", "fsdp"] and "| fsdp | 2 |" in proc.stdout
    for ddp, fsdp in zip(results["ddp"]["per_rank"], results["fsdp"]["per_rank"], strict=True):
        assert fsdp["optimizer_bytes"] <= 0.55 * ddp["optimizer_bytes"], (ddp, fsdp)
        assert fsdp["param_bytes"] <= 0.55 * ddp["param_bytes"] and fsdp["grad_bytes"] <= 0.55 * ddp["grad_bytes"]
        assert fsdp["peak_bytes"] > fsdp["base_bytes"] > 0
    # DDP: every rank holds all of it (4 bytes per float32 weight; AdamW: two moments per weight, and steps).
    params = results["ddp"]["params"]
    assert results["ddp"]["per_rank"][1]["param_bytes"] == 4 * params
    assert 8 * params <= results["ddp"]["per_rank"][1]["optimizer_bytes"] < 8.1 * params


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.mark.parametrize("args, env, expected", [
    (["trainer.strategy=fsdp"], {}, "error: trainer.strategy=fsdp shards the model over processes: start it with"),
    (["trainer.strategy=zero"], {}, "error: trainer.strategy=zero: must be one of ddp, fsdp"),
    (["trainer.compile=true"], {"CXX": "/nonexistent/g++"},
     "error: trainer.compile=true cannot work here: compiling for the CPU needs a C++ compiler"),
])
def test_bad_combinations_are_one_line_and_exit_2(tmp_path, args, env, expected):
    proc = run([sys.executable, MAIN, *TINY, *args, f"trainer.log_file={tmp_path / 'log.jsonl'}"], cwd=tmp_path,
               env=cpu_env(**env), check=False)
    assert one_error_line(proc).startswith(expected)
    assert proc.returncode == 2


def test_fsdp_with_a_world_size_the_config_cannot_use(tmp_path):
    """3 validation batches on 2 ranks: under FSDP every forward needs every rank, so both must run as many."""
    proc = run(torchrun(2, "minGPT-ddp/main.py", *TINY, "trainer.strategy=fsdp", "trainer.eval_iters=3",
                        f"trainer.log_file={tmp_path / 'log.jsonl'}"), cwd=tmp_path, check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: trainer.strategy=fsdp needs the same number of validation batches on every rank: "
                      "trainer.eval_iters=3 is not a multiple of the world size 2"]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # torchrun's report: both ranks exited 2
    assert 'main.py", line' not in proc.stderr  # no traceback of ours (torchrun prints its own report)
