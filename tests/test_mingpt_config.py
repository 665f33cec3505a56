"""minGPT-ddp's settings out of range: one line naming the key and what it allows, exit code 2.

Without these checks a bad value trains nonsense instead of failing: model.block_size=0 gives
NaN losses and exits 0, trainer.beta2=1.5 makes AdamW diverge. The checks run in this process
(fast, one case per rule); a run of main.py as a learner starts it shows there is no traceback
either.
"""
import sys

import pytest

from conftest import REPO, run

CPU_CFG = "config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml")

# override, what the one line must say (at least one case for every rule: see below)
BAD_SETTINGS = [
    ("model.n_layer=0", "model.n_layer=0: must be at least 1"),
    ("model.n_head=0", "model.n_head=0: must be at least 1"),
    ("model.n_embd=0", "model.n_embd=0: must be at least 1"),
    ("model.n_head=5", "model.n_embd=128: must be a multiple of model.n_head (5)"),
    ("model.block_size=0", "model.block_size=0: must be at least 1"),
    ("model.dropout=1.0", "model.dropout=1.0: must be in [0, 1)"),
    ("data.train_fraction=1.0", "data.train_fraction=1.0: must be between 0 and 1"),
    ("trainer.max_iters=0", "trainer.max_iters=0: must be at least 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0: must be at least 1"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps=0: must be at least 1"),
    ("trainer.learning_rate=-1", "trainer.learning_rate=-1.0: must be positive"),
    ("trainer.min_lr=0.1", "trainer.min_lr=0.1: must be null (learning_rate / 10) or between 0 and trainer.learning_rate (0.002)"),
    ("trainer.warmup_iters=-1", "trainer.warmup_iters=-1: must be 0 or more"),
    ("trainer.lr_decay_iters=-5", "trainer.lr_decay_iters=-5: must be null (trainer.max_iters) or at least 1"),
    ("trainer.warmup_iters=500 trainer.lr_decay_iters=300",
     "trainer.lr_decay_iters=300: must be null or at least trainer.warmup_iters (500), for the decay follows the warmup"),
    ("trainer.lr_base_world_size=0", "trainer.lr_base_world_size=0: must be at least 1"),
    ("trainer.beta1=-0.1", "trainer.beta1=-0.1: must be in [0, 1)"),
    ("trainer.beta2=1.5", "trainer.beta2=1.5: must be in [0, 1)"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1: must be 0 or more"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0: must be 0 (no clipping) or more"),
    ("trainer.eval_interval=-1", "trainer.eval_interval=-1: must be 0 (only at the end) or more"),
    ("trainer.eval_iters=0", "trainer.eval_iters=0: must be at least 1"),
    ("trainer.log_interval=0", "trainer.log_interval=0: must be at least 1"),
    ("trainer.peak_flops=0", "trainer.peak_flops=0.0: must be null (data sheet or measured) or positive"),
    ("trainer.lr_scaling=cubic", "trainer.lr_scaling=cubic: must be one of none, sqrt, linear"),
    ("trainer.dtype=float8", "trainer.dtype=float8: must be one of auto, float32, bfloat16, float16"),
    ("trainer.strategy=zero3", "trainer.strategy=zero3: must be one of ddp, handmade, zero1, fsdp"),
    ("trainer.reshard_after_forward=false",
     "trainer.reshard_after_forward=False: must be true unless trainer.strategy=fsdp "
     "(an FSDP setting)"),
    ("trainer.bucket_cap_mb=0", "trainer.bucket_cap_mb=0.0: must be positive"),
    ("trainer.comm_hook=int8", "trainer.comm_hook=int8: must be one of none, fp16, bf16"),
    ("trainer.comm_hook=fp16 trainer.strategy=fsdp",
     "trainer.comm_hook=fp16: must be none unless trainer.strategy is ddp or zero1 "
     "(a hook of torch's DDP)"),
    ("trainer.resume=maybe", "trainer.resume=maybe: must be one of false, true, auto"),
    ("trainer.resume=true trainer.snapshot_path=null",
     "trainer.resume=True: must be false without a trainer.snapshot_path"),
    ("trainer.timeout_minutes=0", "trainer.timeout_minutes=0.0: must be positive"),
]


def test_cpu_config_itself_is_valid(mingpt):
    """The base of every case below: so each failure comes from its one override alone."""
    cfg, _, _ = mingpt.config.load([CPU_CFG])
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.trainer.learning_rate) == (128, 4, 2e-3)


@pytest.mark.parametrize("override, message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_and_exit_code_2(mingpt, capsys, override, message):
    with pytest.raises(SystemExit) as stop:
        mingpt.config.load([CPU_CFG, *override.split()])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {message}"], lines


def test_every_rule_has_a_case(mingpt):
    """A rule added to config.rules without a case above fails here. Each case counts for the first
    rule it breaks (the one whose message the test above checks)."""
    cfg, _, _ = mingpt.config.parse([CPU_CFG])
    assert mingpt.config.first_broken_rule(cfg) is None
    covered = {}
    for override, _ in BAD_SETTINGS:
        cfg, _, _ = mingpt.config.parse([CPU_CFG, *override.split()])
        covered[mingpt.config.first_broken_rule(cfg)[0]] = override
    missing = [key for i, (key, _, _) in enumerate(mingpt.config.rules(cfg)) if i not in covered]
    assert not missing, f"config rules without a case in BAD_SETTINGS: {missing}"


def test_main_stops_before_training_without_a_traceback(tmp_path):
    proc = run([sys.executable, REPO / "minGPT-ddp" / "main.py", CPU_CFG, "model.block_size=0"],
               cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: model.block_size=0: must be at least 1"]
    assert proc.stdout == ""  # nothing trained, nothing written


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "error: --top-k must be at least 1, not 0"),
    (["--top-k", "-3"], "error: --top-k must be at least 1, not -3"),
    (["--temperature", "0"], "error: --temperature must be above 0 (it divides the logits), not 0.0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1, not 0"),
    (["--num-samples", "0"], "error: --num-samples must be at least 1, not 0"),
    (["--prompt", ""], "error: --prompt is empty; give at least one character"),
])
def test_sample_flags_out_of_range(mingpt, monkeypatch, capsys, tmp_path, flags, message):
    """Checked before the snapshot is read: no snapshot is needed to see the error. In this
    process (sample.main reads sys.argv); the run of main.py above shows that a real process
    prints no traceback."""
    import sample
    try:
        monkeypatch.setattr(sys, "argv",
                            ["sample.py", "--snapshot", str(tmp_path / "none.pt"), *flags])
        with pytest.raises(SystemExit) as stop:
            sample.main()
    finally:
        sys.modules.pop("sample", None)  # not among the modules the mingpt fixture puts back
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]
