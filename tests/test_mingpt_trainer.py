"""minGPT-ddp's trainer in this process, one rank, no process group: the rules that need no other rank.

Which precision `trainer.dtype=auto` picks on machines this one is not (faked with machine.Machine),
the deterministic switch, and the loss kept in float32 when the weights are bf16/fp16 (FSDP's mixed
precision). The tiny GPT of the other tests; a step takes milliseconds here.
"""
import os
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT

CPU_CFG = "config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml")
# Modules the conftest fixture `mingpt` does not put back: imported here, removed afterwards.
EXTRA_MODULES = ("machine", "main", "handmade", "traffic")


@pytest.fixture(scope="module")
def mg(mingpt):
    """minGPT-ddp's modules, and the default corpus read once for every test of this file."""
    import ddp_setup
    import machine
    import main
    import trainer
    data = mingpt.char_dataset.CharData(mingpt.char_dataset.DataConfig(), 32)
    yield type("MinGPT", (), dict(config=mingpt.config, model=mingpt.model, trainer=trainer, machine=machine,
                                  ddp_setup=ddp_setup, main=main, data=data))
    for name in EXTRA_MODULES:
        sys.modules.pop(name, None)


def one_rank_trainer(mg, *overrides):
    """A Trainer as main.py builds it for one plain process (peak FLOP/s given: no matmul probe)."""
    cfg, _, _ = mg.config.load([CPU_CFG, *TINY_GPT, "trainer.peak_flops=1e12", "trainer.snapshot_path=null",
                                "trainer.log_file=null", *overrides])
    rt = mg.ddp_setup.Runtime(0, 0, 1, torch.device("cpu"), None)
    torch.manual_seed(cfg.trainer.seed)
    return mg.trainer.Trainer(cfg, mg.model.GPT(cfg.model, len(mg.data.vocab)), mg.data, rt)


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
    assert not torch.are_deterministic_algorithms_enabled()
    one_rank_trainer(mg)  # the default leaves it off
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("machine_kw, device, expected", [
    # A T4 or V100 only emulates bf16: float16 with a gradient scaler, as step 06 picks there.
    (dict(accelerator="cuda", gpus=1, gpu_name="Tesla T4", gpu_bf16=False), "cuda", torch.float16),
    (dict(accelerator="cuda", gpus=8, gpu_name="NVIDIA A100-SXM4-80GB", gpu_bf16=True), "cuda", torch.bfloat16),
    # CPU processes (also those of a GPU machine with fewer GPUs than processes): bf16 only where native.
    (dict(accelerator="cuda", gpus=1, gpu_name="Tesla T4", gpu_bf16=False, cpu_bf16=True), "cpu", torch.bfloat16),
    (dict(cpu_bf16=False), "cpu", torch.float32),
    (dict(cpu_bf16=True), "cpu", torch.bfloat16),
], ids=["T4", "A100", "T4-machine-cpu-ranks", "cpu", "cpu-avx512-bf16"])
def test_dtype_auto_on_faked_machines(mg, monkeypatch, machine_kw, device, expected):
    faked = mg.machine.Machine(**machine_kw)
    monkeypatch.setattr(mg.machine.Machine, "here", classmethod(lambda cls: faked))
    assert mg.trainer.resolve_dtype("auto", torch.device(device)) == expected
    # A dtype named in the config is taken as it is, whatever the machine.
    assert mg.trainer.resolve_dtype("float32", torch.device(device)) == torch.float32
