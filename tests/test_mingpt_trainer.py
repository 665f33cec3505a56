"""minGPT-ddp in this process, one rank, no process group: what needs no other rank, checked
without starting a process (each costs seconds here; test_mingpt_train.py starts the real ones).

Which precision `trainer.dtype=auto` picks on machines this one is not (faked with
machine.Machine); the deterministic switch; the settings a world size or a machine cannot run
(main.py checks them on every rank before training: one line, exit code 2); the global batch of
gpt2_train_cfg.yaml on 1 to 16 ranks; bad input, a corrupt snapshot, a float16 run resuming a
float32 snapshot, nothing left to train; --help of every script; a failing download.
"""
import os
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT, free_port

CPU_CFG = "config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml")
# Modules the conftest fixture `mingpt` does not put back: imported here, removed afterwards.
EXTRA_MODULES = ("machine", "main", "handmade", "traffic", "sample", "bench", "prepare")
ONE_PROCESS = dict(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


@pytest.fixture(scope="module")
def mg(mingpt):
    """minGPT-ddp's modules, and the default corpus read once for every test of this file."""
    import bench
    import ddp_setup
    import machine
    import main
    import prepare
    import sample
    import trainer
    data = mingpt.char_dataset.CharData(mingpt.char_dataset.DataConfig(), 32)
    yield type("MinGPT", (), dict(
        config=mingpt.config, model=mingpt.model, char_dataset=mingpt.char_dataset,
        trainer=trainer, machine=machine, ddp_setup=ddp_setup, main=main, sample=sample,
        bench=bench, prepare=prepare, data=data))
    for name in EXTRA_MODULES:
        sys.modules.pop(name, None)


def tiny_config(mg, *overrides):
    cfg, _, _ = mg.config.load([CPU_CFG, *TINY_GPT, "trainer.peak_flops=1e12",
                                "trainer.snapshot_path=null", "trainer.log_file=null", *overrides])
    return cfg


def one_rank_trainer(mg, *overrides):
    """A Trainer as main.py builds it for one plain process (peak FLOP/s given: no matmul probe)."""
    return mg.main.build_trainer(tiny_config(mg, *overrides), mg.data,
                                 mg.ddp_setup.Runtime(**ONE_PROCESS))


def one_error_line(capsys, stop) -> str:
    """The one line a config error printed (exit code 2)."""
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_deterministic_turns_on_deterministic_kernels(mg, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        trainer = one_rank_trainer(mg, "trainer.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's condition for it
        # Every kernel of a training step has a deterministic version on the CPU: the step runs.
        assert torch.isfinite(trainer.train_step(0))
    finally:
        torch.use_deterministic_algorithms(False)
    one_rank_trainer(mg)  # the default leaves it off
    assert not torch.are_deterministic_algorithms_enabled()


T4 = dict(accelerator="cuda", gpus=1, gpu_name="Tesla T4", gpu_bf16=False)
A100 = dict(accelerator="cuda", gpus=8, gpu_name="NVIDIA A100-SXM4-80GB", gpu_bf16=True)


@pytest.mark.parametrize("machine_kw, device, expected", [
    # A T4 or V100 only emulates bf16: float16 with a gradient scaler, as step 06 picks there.
    (T4, "cuda", torch.float16),
    (A100, "cuda", torch.bfloat16),
    # CPU processes (also those of a GPU machine with fewer GPUs than processes): bf16 only where
    # the CPU has it natively.
    (dict(T4, cpu_bf16=True), "cpu", torch.bfloat16),
    (dict(cpu_bf16=False), "cpu", torch.float32),
    (dict(cpu_bf16=True), "cpu", torch.bfloat16),
], ids=["T4", "A100", "T4-machine-cpu-ranks", "cpu", "cpu-avx512-bf16"])
def test_dtype_auto_on_faked_machines(mg, monkeypatch, machine_kw, device, expected):
    faked = mg.machine.Machine(**machine_kw)
    monkeypatch.setattr(mg.machine.Machine, "here", classmethod(lambda cls: faked))
    assert mg.trainer.resolve_dtype("auto", torch.device(device)) == expected
    # A dtype named in the config is taken as it is, whatever the machine.
    assert mg.trainer.resolve_dtype("float32", torch.device(device)) == torch.float32


@pytest.mark.parametrize("overrides, world_size, backend, expected", [
    (["trainer.strategy=fsdp"], 1, None,
     "error: trainer.strategy=fsdp shards over processes: start it with torchrun (torchrun "),
    (["trainer.strategy=zero1"], 1, None, "error: trainer.strategy=zero1 shards over processes"),
    # Every forward of FSDP gathers weights from all ranks: all must run as many validation batches
    (["trainer.strategy=fsdp", "trainer.eval_iters=3"], 2, "gloo",
     "error: trainer.strategy=fsdp needs the same number of validation batches on every rank: "
     "trainer.eval_iters=3 is not a multiple of the world size 2"),
    (["trainer.fixed_global_batch=true", "trainer.grad_accum_steps=8"], 3, "gloo",
     "error: trainer.fixed_global_batch=true shares trainer.grad_accum_steps=8 micro-batches "
     "among the ranks: 3 ranks cannot share them evenly; make trainer.grad_accum_steps a "
     "multiple of 3"),
    (["trainer.comm_hook=bf16"], 2, "gloo", "error: trainer.comm_hook=bf16 needs NCCL or XCCL"),
    (["trainer.static_graph=true", "trainer.grad_accum_steps=2"], 2, "gloo",
     "error: trainer.static_graph=true cannot accumulate gradients: DDP stops with an "
     "internal assert in backward under no_sync() (pytorch/pytorch#143580)"),
], ids=["fsdp-one-process", "zero1-one-process", "fsdp-eval-iters", "global-batch",
        "bf16-hook-gloo", "static-graph-accumulation"])
def test_setups_this_world_cannot_run(mg, capsys, overrides, world_size, backend, expected):
    """main.py checks these on every rank as the process group starts (trainer.check_setup)."""
    rt = mg.ddp_setup.Runtime(0, 0, world_size, torch.device("cpu"), backend)
    with pytest.raises(SystemExit) as stop:
        mg.trainer.check_setup(tiny_config(mg, *overrides).trainer, rt)
    assert one_error_line(capsys, stop).startswith(expected)


def test_compile_without_a_compiler_is_one_line(mg, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(SystemExit) as stop:
        mg.trainer.check_setup(tiny_config(mg, "trainer.compile=true").trainer,
                               mg.ddp_setup.Runtime(**ONE_PROCESS))
    assert one_error_line(capsys, stop).startswith(
        "error: trainer.compile=true cannot work here: compiling for the CPU needs a C++ compiler")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8, 16])
def test_gpt2_config_keeps_its_global_batch_on_any_world_size(mg, capsys, world_size):
    """gpt2_train_cfg.yaml shares its micro-batches among the ranks (nanoGPT's train_gpt2 does the
    same): a step sees the same tokens on 1 GPU or 16, so its step count means the same training
    everywhere. Its validation batches divide among 3, 6, 8 and 16 ranks too (FSDP needs that)."""
    cfg, _, _ = mg.config.load(["config=" + str(REPO / "minGPT-ddp" / "gpt2_train_cfg.yaml")])
    tcfg = cfg.trainer
    rt = mg.ddp_setup.Runtime(0, 0, world_size, torch.device("cpu"),
                              "gloo" if world_size > 1 else None)
    for strategy in ("ddp", "fsdp") if world_size > 1 else ("ddp",):
        tcfg.strategy = strategy
        if 16 % world_size:  # 3 and 6 ranks cannot share 16 micro-batches: said in one line
            with pytest.raises(SystemExit):
                mg.trainer.check_setup(tcfg, rt)
            assert "cannot share them evenly" in capsys.readouterr().err
            continue
        mg.trainer.check_setup(tcfg, rt)
        per_rank = mg.trainer.micro_steps_per_rank(tcfg, world_size)
        tokens_per_step = per_rank * world_size * tcfg.batch_size * cfg.model.block_size
        assert tokens_per_step == 65536
    assert tcfg.eval_iters % 48 == 0  # 48 = 3 x 16: FSDP shares them on 3, 6, 8 and 16 ranks


def test_nothing_left_to_train_is_an_error(mg):
    trainer = one_rank_trainer(mg, "trainer.max_iters=10")
    trainer.step = 10  # as a snapshot at step 10 leaves it
    with pytest.raises(SystemExit, match="snapshot is at step 10, trainer.max_iters=10 leaves "
                                         "nothing to train"):
        trainer.fit()


@pytest.fixture
def float32_snapshot(mg, tmp_path):
    """A snapshot of one step of the tiny GPT in float32, written as main.py writes it."""
    path = tmp_path / "fp32.pt"
    trainer = one_rank_trainer(mg, "trainer.dtype=float32", f"trainer.snapshot_path={path}")
    trainer.train_step(0)
    trainer.step = 1
    trainer.save_snapshot()
    return path


def test_float16_cannot_resume_a_float32_snapshot(mg, capsys, float32_snapshot):
    """A float32 run has no gradient-scaler state for float16 to continue with."""
    cfg = tiny_config(mg, "trainer.dtype=float16", "trainer.resume=true",
                      f"trainer.snapshot_path={float32_snapshot}")
    with pytest.raises(SystemExit) as stop:
        mg.main.snapshot_to_resume(cfg, mg.data, mg.ddp_setup.Runtime(**ONE_PROCESS))
    line = one_error_line(capsys, stop)
    assert line.startswith(f"error: trainer.dtype=float16 cannot resume snapshot "
                           f"{float32_snapshot}: it was trained with trainer.dtype=float32")
    assert "resume with trainer.dtype=float32 or bfloat16" in line
    cfg.trainer.dtype = "bfloat16"  # which it can
    state = mg.main.snapshot_to_resume(cfg, mg.data, mg.ddp_setup.Runtime(**ONE_PROCESS))
    assert state["step"] == 1


def test_a_corrupt_or_missing_snapshot_is_one_line(mg, capsys, tmp_path):
    bad, none = tmp_path / "bad.pt", tmp_path / "none.pt"
    bad.write_bytes(b"not a snapshot, half a file")
    for path, expected in (
            (bad, f"error: cannot read snapshot {bad}: it is corrupt, truncated or not a snapshot"),
            (none, f"error: snapshot {none} not found")):
        cfg = tiny_config(mg, "trainer.resume=true", f"trainer.snapshot_path={path}")
        with pytest.raises(SystemExit) as stop:
            mg.main.snapshot_to_resume(cfg, mg.data, mg.ddp_setup.Runtime(**ONE_PROCESS))
        assert one_error_line(capsys, stop).startswith(expected)
    with pytest.raises(SystemExit, match="^error: cannot read snapshot"):  # sample.py alike
        mg.sample.load_model(str(bad))


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.max_iter=5"], "error: unknown config key 'trainer.max_iter' (on the command line); "
                             "valid keys: trainer.max_iters, "),
    (["trainer.max_iters=many"], "error: bad value for config key trainer.max_iters"),
    (["model.n_layer=2", "model.n_layer"],
     "error: expected KEY=VALUE, got 'model.n_layer' (see --help)"),
])
def test_bad_input_is_one_clear_line(mg, capsys, overrides, expected):
    with pytest.raises(SystemExit) as stop:
        mg.config.load([CPU_CFG, *overrides])
    assert one_error_line(capsys, stop).startswith(expected)


def test_a_missing_data_file_is_one_clear_line(mg):
    with pytest.raises(SystemExit, match="^error: data file no_such_file.txt not found"):
        mg.char_dataset.CharData(mg.char_dataset.DataConfig(path="no_such_file.txt"), 32)


@pytest.mark.parametrize("script", ["main", "sample", "bench", "prepare"])
def test_help(mg, capsys, monkeypatch, script):
    """Every script answers --help with its usage; main.py also lists every config key with its
    default value."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    if script == "main":
        mg.main.main(["--help"])
    else:
        with pytest.raises(SystemExit) as stop:
            mg.bench.parse_args() if script == "bench" else getattr(mg, script).main()
        assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if script == "main":
        assert "  strategy: ddp\n" in out and "  fixed_global_batch: false\n" in out


def test_prepare_fails_clearly_when_the_download_fails(mg, monkeypatch, tmp_path):
    out = tmp_path / "shakespeare.txt"
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--out", str(out),
                                      "--url", f"http://127.0.0.1:{free_port()}/x"])
    with pytest.raises(SystemExit, match="^error: cannot download http://127.0.0.1:"):
        mg.prepare.main()
    assert not list(tmp_path.iterdir())  # nothing written, not half a file either
