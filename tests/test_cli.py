"""Every step script explains itself with --help, turns bad input into one clear line and a non-zero exit,
and picks its device by one rule: GPUs + NCCL when the node has a GPU for every process, else the CPU + Gloo."""
import socket
import sys
from datetime import timedelta

import pytest
import torch

from conftest import REPO, cpu_env, free_port, load_script, run

STEPS = sorted(p.name for p in REPO.glob("0[0-9]_*.py"))
TRAINING_STEPS = ["01_single_gpu.py", "02_multigpu_mp_spawn.py", "03_multigpu_torchrun.py", "05_singlenode_cpu.py",
                  "06_amp.py"]
TORCHRUN_STEPS = ["03_multigpu_torchrun.py", "05_singlenode_cpu.py", "06_amp.py"]


@pytest.mark.parametrize("script", STEPS)
def test_help(tmp_path, script):
    proc = run([sys.executable, REPO / script, "--help"], cwd=tmp_path)
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout


def last_error_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", TRAINING_STEPS)
def test_bad_flag_values(tmp_path, script):
    proc = run([sys.executable, REPO / script, "--max_epochs", "0"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert last_error_line(proc).endswith("error: --max_epochs must be at least 1")


def test_port_in_use_is_named(tmp_path):
    """Step 02 listens on MASTER_PORT (default 12355); a busy one is named by PyTorch, and nothing hangs."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run([sys.executable, REPO / "02_multigpu_mp_spawn.py", "--max_epochs", "1"], cwd=tmp_path,
                   env=cpu_env(MASTER_PORT=port), check=False, timeout=120)
    assert proc.returncode != 0
    assert f"port: {port}" in proc.stderr and "address already in use" in proc.stderr


@pytest.mark.parametrize("script", TORCHRUN_STEPS)
def test_torchrun_script_says_how_to_start_it(tmp_path, script):
    proc = run([sys.executable, REPO / script], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert last_error_line(proc) == f"error: use torchrun: torchrun --standalone --nproc-per-node 2 {script}"


def fake_gpus(monkeypatch, count: int):
    """Make torch believe this machine has `count` CUDA GPUs (the planning logic only asks these two)."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device("cuda") if count else None)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)


@pytest.mark.parametrize("script", ["02_multigpu_mp_spawn.py", *TORCHRUN_STEPS, "minGPT-ddp/ddp_setup.py"])
@pytest.mark.parametrize("gpus,processes,expected", [
    (0, 2, ("cpu", "gloo")),   # a laptop
    (1, 1, ("cuda", "nccl")),  # a hosted notebook, one process
    (1, 2, ("cpu", "gloo")),   # a hosted notebook asked for two processes: both on the CPU
    (4, 4, ("cuda", "nccl")),  # a multi-GPU box
    (4, 2, ("cuda", "nccl")),
    (4, 8, ("cpu", "gloo")),   # more processes than GPUs
])
def test_device_plan_with_faked_gpu_count(monkeypatch, script, gpus, processes, expected):
    step = load_script(script)
    fake_gpus(monkeypatch, gpus)
    for gpu_index in range(processes):
        device, backend = step.pick_device(gpu_index, processes)
        assert (device.type, backend) == expected
        assert device.index == (gpu_index if device.type == "cuda" else None)


@pytest.mark.parametrize("script", ["05_singlenode_cpu.py", "06_amp.py"])
def test_cpu_flag_keeps_a_gpu_machine_on_its_cpu(monkeypatch, script):
    step = load_script(script)
    fake_gpus(monkeypatch, 4)
    assert step.pick_device(0, 2, cpu=True) == (torch.device("cpu"), "gloo")


@pytest.mark.parametrize("gpus,default_world_size", [(0, 2), (1, 2), (4, 4)])
def test_step02_default_world_size(monkeypatch, gpus, default_world_size):
    """One process per GPU where there are two or more; else two (on the CPU, by the rule above)."""
    step = load_script("02_multigpu_mp_spawn.py")
    fake_gpus(monkeypatch, gpus)
    assert step.parse_args([]).world_size == default_world_size


@pytest.mark.parametrize("script", [*TORCHRUN_STEPS, "minGPT-ddp/ddp_setup.py"])
@pytest.mark.parametrize("use_libuv", ["0", "1"])
def test_use_libuv_reaches_the_store(monkeypatch, script, use_libuv):
    """The README's advice for systems without libuv (USE_LIBUV=0) is true: the store the scripts build through
    env:// reads it, where a dist.TCPStore built by hand would not."""
    monkeypatch.setenv("USE_LIBUV", use_libuv)
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    found = load_script(script).store_for_this_attempt(timedelta(seconds=20))
    store = found[0] if isinstance(found, tuple) else found  # the steps also return rank and world size
    assert store.underlying_store.libuvBackend == (use_libuv == "1")
