"""minGPT-ddp end to end, real processes, real Gloo groups on the CPU.

The four strategies (ddp, handmade, zero1, fsdp) train the same model; accumulation sends once;
every rank ends with the same weights; snapshots resume under any strategy, also after a crash and
a torchrun restart, and across two "nodes"; zero1 and fsdp hold half the AdamW state on 2 ranks;
float16 clips the true gradients; the DDP benchmark runs. (What needs no process group:
test_mingpt_trainer.py, in this process.)

Two groups, of 2 and of 3 ranks, each train many short runs in turn
(tests/workers/mingpt_strategies.py, as main.py trains; a run marked `alone` trains in rank 0
alone, as one plain process does, while the other ranks wait). Each run: the tiny GPT, 10 steps,
learning rate 3e-3.

grad_clip=0 and AdamW's moments: AdamW divides the gradient by its own running size, so a gradient
twice too large (a sum instead of a mean, an average left out) moves the weights almost as the
right one does; and with clipping at 1 every step of these runs is clipped, which hides the scale
once more. The moments exp_avg and exp_avg_sq scale with the gradient and its square: compared,
they catch a wrong scale at once.

Tolerances. On 2 ranks every strategy sums the same two float32 numbers for each gradient element,
and a + b = b + a; the mean then divides by 2, exactly: bit-identical, so 0. On 3 ranks, and 2
ranks against 1, the additions come in another order (Gloo's ring cuts each buffer in chunks that
depend on the bucket layout; one rank adds its micro-steps itself), which changes a gradient in its
last bits; 10 steps carry that into the weights by 1.2e-7 and into the moments by 1.5e-6 of their
size (the largest measured). So weights within 1e-6 and moments within 1e-4 relative: a wrong
gradient scale moves the moments by 50 % or more, a missing all-reduce by about 100 %.
"""
import json
import shutil
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT, exit_checked_env, run, start_nodes, torchrun

WORKER = "tests/workers/mingpt_strategies.py"
COMMON = ["config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml"), *TINY_GPT,
          "trainer.learning_rate=3e-3", "trainer.max_iters=10", "trainer.eval_interval=5",
          "trainer.grad_clip=0", "trainer.peak_flops=1e12"]
WEIGHTS_TOL, MOMENTS_TOL = 1e-6, 1e-4  # 3 ranks, or 1 rank against 2: summation order (see above)
N_LAYER = int(next(o for o in TINY_GPT if o.startswith("model.n_layer=")).split("=")[1])

S, A, B = "trainer.strategy", "trainer.grad_accum_steps", "trainer.batch_size"
FP16, CLIP = "trainer.dtype=float16", "trainer.grad_clip=1"
# The hand-made DDP in buckets of 31 kB: 4 of them for the tiny GPT's 113 kB of gradients
HANDMADE = ("trainer.strategy=handmade", "trainer.bucket_cap_mb=0.03")
# 32 sequences per step on 2 ranks: 16 per rank at once (a1), or 2 micro-steps of 8 (the default)
TWO_RANKS = {
    "ddp_a1": [f"{S}=ddp", f"{B}=16"], "handmade_a1": [*HANDMADE, f"{B}=16"],
    "fsdp_a1": [f"{S}=fsdp", f"{B}=16"],
    "ddp": [f"{S}=ddp", f"{A}=2"], "handmade": [*HANDMADE, f"{A}=2"],
    "zero1": [f"{S}=zero1", f"{A}=2"], "fsdp": [f"{S}=fsdp", f"{A}=2"],
    "fsdp_zero2": [f"{S}=fsdp", f"{A}=2", "trainer.reshard_after_forward=false"],
    # 4 micro-batches shared by the ranks: 2 each
    "ddp_global_batch": [f"{S}=ddp", f"{A}=4", "trainer.fixed_global_batch=true"],
    # DDP's levers (README, "Making DDP fast")
    "ddp_small_buckets": [f"{S}=ddp", f"{A}=2", "trainer.bucket_cap_mb=0.03"],
    # (static_graph cannot accumulate: pytorch/pytorch#143580, refused in one line)
    "ddp_static_graph": [f"{S}=ddp", f"{B}=16", "trainer.static_graph=true",
                         "trainer.gradient_as_bucket_view=false"],
    "ddp_fp16_hook": [f"{S}=ddp", f"{A}=2", "trainer.comm_hook=fp16"],
    # each resumes at step 5 a snapshot that another strategy wrote
    "zero1_from_fsdp": [f"{S}=zero1", f"{A}=2", "resume_from=fsdp@5"],
    "fsdp_from_zero1": [f"{S}=fsdp", f"{A}=2", "resume_from=zero1@5"],
    "ddp_from_zero1": [f"{S}=ddp", f"{A}=2", "resume_from=zero1@5"],
    # float16 with a gradient scaler against float32, both clipped at 1
    "ddp_clip": [f"{S}=ddp", f"{A}=2", CLIP], "ddp_fp16": [f"{S}=ddp", f"{A}=2", CLIP, FP16],
    "fsdp_fp16": [f"{S}=fsdp", f"{A}=2", FP16],
    # one process, 4 micro-steps of 8: the same 32 sequences
    "accum4_alone": [f"{A}=4", "trainer.fixed_global_batch=true", "alone"],
    # dropout on: the resumed half must also draw the same dropout masks
    "straight": [f"{A}=2", "model.dropout=0.1"],
    "first_half": [f"{A}=2", "model.dropout=0.1", "trainer.max_iters=5",
                   "trainer.lr_decay_iters=10"],
    "resumed": [f"{A}=2", "model.dropout=0.1", "trainer.lr_decay_iters=10",
                "resume_from=first_half@5"],
}
THREE_RANKS = {  # 24 sequences per step, or 48 with 2 micro-steps
    "ddp_a1": [f"{S}=ddp"], "handmade_a1": [*HANDMADE],
    "ddp": [f"{S}=ddp", f"{A}=2"], "handmade": [*HANDMADE, f"{A}=2"],
    "zero1": [f"{S}=zero1", f"{A}=2"],
}


def train_in_turn(out, runs: dict, nproc: int):
    specs = [f"{name}:{','.join(overrides)}" for name, overrides in runs.items()]
    proc = run(torchrun(nproc, WORKER, out, *specs, "--", *COMMON), cwd=out, timeout=400)
    assert proc.stdout.count(" finished at step ") == len(runs), proc.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return train_in_turn(tmp_path_factory.mktemp("two_ranks"), TWO_RANKS, 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return train_in_turn(tmp_path_factory.mktemp("three_ranks"), THREE_RANKS, 3)


def snapshot(folder, name):
    return torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)


def report(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


def losses(folder, name) -> dict:
    """(iter, "loss" or "val_loss") -> value, from a run's JSONL log."""
    records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    return {(r["iter"], key): r[key] for r in records for key in ("loss", "val_loss") if key in r}


def weights_difference(a: dict, b: dict) -> float:
    assert a["model"].keys() == b["model"].keys()
    return max((a["model"][k].float() - b["model"][k].float()).abs().max().item()
               for k in a["model"])


def moments_difference(a: dict, b: dict) -> float:
    """The largest relative difference of AdamW's moments (exp_avg, exp_avg_sq), any parameter."""
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    return max(((sa[k][m] - sb[k][m]).norm() / sb[k][m].norm()).item()
               for k in sa for m in ("exp_avg", "exp_avg_sq"))


def assert_same_training(a: dict, b: dict, weights_tol=0.0, moments_tol=0.0):
    assert a["step"] == b["step"] == 10
    assert weights_difference(a, b) <= weights_tol
    assert moments_difference(a, b) <= moments_tol


@pytest.mark.parametrize("name, reference", [
    ("handmade_a1", "ddp_a1"), ("fsdp_a1", "ddp_a1"), ("handmade", "ddp"), ("zero1", "ddp"),
    ("fsdp", "ddp"), ("fsdp_zero2", "ddp"), ("ddp_global_batch", "ddp"),
    ("ddp_small_buckets", "ddp"), ("ddp_static_graph", "ddp_a1"),
])
def test_every_strategy_trains_the_same_model_on_two_ranks(two, name, reference):
    """Bit-identical weights and AdamW moments (tolerance 0: see the module's docstring)."""
    assert_same_training(snapshot(two, name), snapshot(two, reference))


@pytest.mark.parametrize("name, reference", [
    ("handmade_a1", "ddp_a1"), ("handmade", "ddp"), ("zero1", "ddp")])
def test_every_strategy_trains_the_same_model_on_three_ranks(three, name, reference):
    assert_same_training(snapshot(three, name), snapshot(three, reference),
                         WEIGHTS_TOL, MOMENTS_TOL)


def test_accumulation_is_a_mean_over_the_larger_batch(two):
    """The same 32 sequences per step: 2 ranks x 2 micro-steps of 8 (DDP skips the all-reduce on
    the first), 2 ranks x 16 at once, 1 process x 4 micro-steps of 8. A gradient summed over the
    micro-steps instead of averaged (backward() before dividing the loss) is 2x or 4x: the
    moments tell."""
    ddp = snapshot(two, "ddp")
    assert_same_training(ddp, snapshot(two, "ddp_a1"), WEIGHTS_TOL, MOMENTS_TOL)
    assert_same_training(snapshot(two, "accum4_alone"), ddp, WEIGHTS_TOL, MOMENTS_TOL)


def test_validation_loss_is_the_mean_over_all_ranks(two):
    """The 4 validation batches are split 2 + 2 between the ranks: only the mean over both equals
    the loss one process computes over all 4 (before any training: the same model). Training
    lowers it."""
    one_process, two_ranks = losses(two, "accum4_alone"), losses(two, "ddp")
    assert two_ranks[0, "val_loss"] == pytest.approx(one_process[0, "val_loss"], abs=1e-6)
    assert two_ranks[10, "val_loss"] < two_ranks[0, "val_loss"] - 0.3


def test_every_rank_holds_the_same_weights(two, three):
    """Not only rank 0's (the one the snapshot saves): a rank-dependent learning rate, or a rank
    that steps on gradients it did not average, leaves the copies apart. (FSDP ranks hold
    different shards; a run alone has one rank.)"""
    for folder, runs in ((two, TWO_RANKS), (three, THREE_RANKS)):
        for name in runs:
            ranks = report(folder, name)["ranks"]
            if not name.startswith("fsdp"):
                assert len({r["weights"] for r in ranks}) == 1, (folder.name, name, ranks)


def test_accumulation_sends_once_per_step(two):
    """Collectives of one optimizer step, counted as they start (minGPT-ddp/traffic.py). With 2
    micro-steps DDP and the hand-made DDP all-reduce once, as with 1: no_sync must cover the first
    micro-step's forward too (DDP decides there), and FSDP must skip the first reduce-scatter
    (set_requires_gradient_sync(False)). The counts match nothing else: a sync too many fails as
    one too few does."""
    counts = {name: report(two, name)["collectives"].get("counts") for name in TWO_RANKS}
    assert counts["ddp"] == counts["ddp_a1"] == {"all_reduce": 1}  # one bucket (DDP's first: 1 MB)
    assert counts["handmade"] == counts["handmade_a1"] == {"all_reduce": 4}  # 4 buckets
    units = N_LAYER + 1  # the blocks and the root: one FSDP unit each
    assert counts["fsdp"]["reduce_scatter"] == counts["fsdp_a1"]["reduce_scatter"] == units
    # ZeRO-3 gathers each block again for backward, and everything again in each micro-step
    assert counts["fsdp_a1"]["all_gather"] == 2 * units - 1
    assert counts["fsdp"]["all_gather"] == 2 * (2 * units - 1)
    # ZeRO-2 keeps the weights from forward until backward
    assert counts["fsdp_zero2"] == {"all_gather": 2 * units, "reduce_scatter": units}
    # ZeRO-1: each rank sends the weights it stepped
    assert counts["zero1"] == {"all_reduce": 1, "broadcast": 2}
    assert counts["ddp_small_buckets"] == {"all_reduce": 4}  # trainer.bucket_cap_mb reaches DDP


def test_a_compression_hook_sends_half_the_bytes_and_changes_the_result_a_little(two):
    """trainer.comm_hook=fp16: each bucket is cast to float16, all-reduced, cast back. Half the
    bytes; the gradients lose their last bits (float16 keeps 11 of float32's 24), so the moments
    move, by 1e-3 of their size or so here: not bit-identical, hence not a default."""
    sent = {name: report(two, name)["collectives"]["bytes_sent"]
            for name in ("ddp", "ddp_fp16_hook")}
    assert sent["ddp_fp16_hook"] == sent["ddp"] / 2
    difference = moments_difference(snapshot(two, "ddp_fp16_hook"), snapshot(two, "ddp"))
    assert 0 < difference < 2e-2


def test_zero1_and_fsdp_hold_half_the_adamw_state_per_rank(two):
    ddp = [r["optimizer_bytes"] for r in report(two, "ddp")["ranks"]]
    for name in ("zero1", "fsdp"):
        sharded = [r["optimizer_bytes"] for r in report(two, name)["ranks"]]
        assert all(s <= 0.55 * d for s, d in zip(sharded, ddp, strict=True)), (name, sharded)
        assert sum(sharded) >= sum(ddp) / 2  # all of it, shared out: each parameter on one rank
    # The bytes each sends per step: ZeRO-1 adds a broadcast of the weights (half an all-reduce)
    sent = {name: report(two, name)["collectives"]["bytes_sent"] for name in ("ddp", "zero1")}
    assert sent["zero1"] == pytest.approx(1.5 * sent["ddp"], rel=0.01)


@pytest.mark.parametrize("name", ["zero1_from_fsdp", "fsdp_from_zero1", "ddp_from_zero1"])
def test_a_snapshot_resumes_under_any_strategy(two, name):
    """Steps 6-10 of each run resumed the step-5 snapshot of another strategy (one whole-model
    file: zero1 consolidates its AdamW state on rank 0, FSDP gathers its shards); all end where
    the uninterrupted DDP run ends, bit for bit."""
    assert_same_training(snapshot(two, name), snapshot(two, "ddp"))


def test_resume_is_bit_identical(two):
    """10 steps straight, or 5 then 5 more after a resume: every tensor of the two snapshots is
    equal (weights, AdamW moments and steps), dropout masks included."""
    straight, resumed = snapshot(two, "straight"), snapshot(two, "resumed")
    assert resumed["step"] == straight["step"] == 10
    assert weights_difference(resumed, straight) == 0.0
    for name, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][name][key], value), (name, key)
    later = {k: v for k, v in losses(two, "straight").items() if k[0] > 5}
    assert losses(two, "resumed") == later


def test_float16_clips_the_true_gradients(two):
    """float16 with a gradient scaler, clipped at 1, against float32: the scaler unscales the
    gradients before clipping, so both clip the same gradients, and the moments agree to float16's
    rounding (1.6e-3 measured; 2e-2 allowed). Clipping the scaled gradients (65536 times larger)
    would shrink them 65536 times."""
    fp16, fp32 = snapshot(two, "ddp_fp16"), snapshot(two, "ddp_clip")
    assert moments_difference(fp16, fp32) < 2e-2
    # No step overflowed, so the scale is still its first value; under FSDP too, whose float16
    # forward has no autocast: the loss must be float32 there, or 65536 x its gradient overflows
    # at once (model.py).
    assert report(two, "ddp_fp16")["scale"] == report(two, "fsdp_fp16")["scale"] == 65536.0


@pytest.fixture(scope="module")
def crashed_and_restarted(tmp_path_factory):
    """The `fsdp` run of TWO_RANKS under main.py, snapshots at steps 5 and 10; rank 1 crashes as
    step 7 begins (injected from outside: tools/mingpt_faults.py); torchrun restarts both
    ranks, which resume from step 5 (trainer.resume=auto). Exit-checked: an FSDP run too must
    leave no Gloo thread after destroy_process_group() (ddp_setup.stop)."""
    out = tmp_path_factory.mktemp("crash")
    proc = run(torchrun(2, "tools/mingpt_faults.py", "--crash-at-step", "7", *COMMON,
                        *TWO_RANKS["fsdp"], "trainer.resume=auto",
                        f"trainer.snapshot_path={out / 'run.pt'}",
                        f"trainer.log_file={out / 'run.jsonl'}", extra=["--max-restarts", "1"]),
               cwd=out, env=exit_checked_env())
    return out, proc


def test_killed_and_restarted_run_ends_bit_identical(crashed_and_restarted, two):
    out, proc = crashed_and_restarted
    assert "simulated crash of rank 1 at step 7" in proc.stderr
    assert f"resuming from {out / 'run.pt'} at step 5" in proc.stdout
    assert "Finished training: steps 5-10" in proc.stdout
    assert_same_training(snapshot(out, "run"), snapshot(two, "fsdp"))  # every float32 bit


def test_what_a_learner_sees(crashed_and_restarted):
    """main.py's header on 2 CPU processes, and each rank's data line: the fingerprints match."""
    _, proc = crashed_and_restarted
    assert ("[cpu rank 0] device cpu | backend gloo | world_size 2 | GPUs here 0 | "
            "1 thread(s) per rank") in proc.stdout
    assert "strategy fsdp (ZeRO-3)" in proc.stdout
    fingerprints = {line.split(" data ")[0]: line.split("fingerprint ")[1]
                    for line in proc.stdout.splitlines() if " data " in line}
    assert set(fingerprints) == {"[cpu rank 0]", "[cpu rank 1]"}
    assert len(set(fingerprints.values())) == 1


def two_nodes(tmp_path, snapshots: dict, *args, timeout=150, env=None):
    """Two torchrun "nodes" on this machine (tests/conftest.py start_nodes: one rank each), each in
    a folder of its own with its own disk's view: snapshots maps folder name -> the snapshot file
    to put at node.pt there."""
    folders = []
    for name, source in snapshots.items():
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        shutil.copy(source, folders[-1] / "node.pt")
    procs = start_nodes(folders, ["minGPT-ddp/main.py", *COMMON, *args,
                                  "trainer.snapshot_path=node.pt", "trainer.log_file=node.jsonl",
                                  "trainer.timeout_minutes=0.5"], timeout=timeout, env=env)
    return dict(zip(snapshots, procs))


def test_nodes_with_different_snapshots_stop_in_one_line(two, tmp_path):
    """Each node's disk holds another snapshot (both at step 10, different runs): resuming would
    train the ranks from different points and diverge silently; every rank stops instead, saying
    why."""
    results = two_nodes(tmp_path, {"a": two / "ddp.pt", "b": two / "handmade_a1.pt"},
                        "trainer.max_iters=12", "trainer.resume=auto")
    for name, proc in results.items():
        assert proc.returncode != 0, name
        errors = [line for line in proc.stderr.splitlines() if " error: " in line]
        assert len(errors) == 1, (name, proc.stderr)
        assert ("error: the nodes see different snapshots at node.pt (rank 0: step 10, sha256 "
                in errors[0])
        assert "rank 1: step 10, sha256 " in errors[0]
        assert "iter " not in proc.stdout and not (tmp_path / name / "node.jsonl").exists()


def test_nodes_with_the_same_snapshot_resume_together(two, tmp_path):
    """Also: main.py leaves no Gloo thread running into Python's exit (exit_checked_env: exit 86
    otherwise, tests/conftest.py)."""
    results = two_nodes(tmp_path, {"a": two / "ddp.pt", "b": two / "ddp.pt"},
                        "trainer.max_iters=12", "trainer.resume=auto", *TWO_RANKS["ddp"],
                        env=exit_checked_env())
    for name, proc in results.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    stdout = "".join(proc.stdout for proc in results.values())
    assert "resuming from node.pt at step 10" in stdout
    assert "Finished training: steps 10-12" in stdout


def test_bench_times_the_ddp_levers_side_by_side(tmp_path):
    """bench.py --ddp-levers: one process group, one model per setting, their windows in turn
    (the README's table comes from it). A smoke test: every row ran and has a speed; no speed is
    asserted (a shared machine)."""
    log = tmp_path / "levers.jsonl"
    proc = run([sys.executable, REPO / "minGPT-ddp" / "bench.py", "--ddp-levers", "--iters", "4",
                "--warmup", "1", "--windows", "1", "--log_file", log, *COMMON], cwd=tmp_path)
    rows = json.loads(log.read_text())["levers"]
    labels = [row["label"] for row in rows]
    assert labels[0] == "1 rank alone, no DDP" and labels[-1] == "no all-reduce (a no-op hook)"
    assert {"strategy=handmade", "comm_hook=fp16", "static_graph=true",
            "gradient_as_bucket_view=false"} < set(labels)
    assert all(row["tokens_per_s"] > 0 and row["efficiency"] > 0 for row in rows)
    assert rows[1]["tokens_per_step"] == 2 * rows[0]["tokens_per_step"]  # 2 ranks, 1 batch each
    assert "| strategy=handmade |" in proc.stdout
