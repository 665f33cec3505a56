"""Every step explains itself with --help, turns bad input into one clear line and exit code 2,
and picks its device by one rule: GPUs + NCCL when the node has a GPU for every process, else
the CPU + Gloo. All in this process (argument parsing and the rule need no process group),
except a busy MASTER_PORT, which only a real start can show."""
import socket
import sys
from datetime import timedelta

import pytest
import torch

import steptools  # noqa: F401  (puts the repository on sys.path: the steps import plumbing.py)
from conftest import REPO, cpu_env, free_port, load_script, run

STEPS = sorted(p.name for p in REPO.glob("0[0-9]_*.py"))
TRAINING_STEPS = ["01_single_gpu.py", "02_multigpu_mp_spawn.py", "03_multigpu_torchrun.py",
                  "05_singlenode_cpu.py", "06_amp.py"]
TORCHRUN_STEPS = ["03_multigpu_torchrun.py", "05_singlenode_cpu.py", "06_amp.py"]


@pytest.fixture(params=STEPS)
def step(request):
    return request.param, load_script(request.param)


def parse_fails(module, argv, capsys) -> str:
    """parse_args(argv) must stop with exit code 2; its one error line (after argparse's usage)."""
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_help(step, capsys):
    name, module = step
    with pytest.raises(SystemExit) as stop:
        module.parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out and f"Step {name[:2]}:" in out


@pytest.mark.parametrize("script", TRAINING_STEPS)
def test_bad_flag_values(script, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun: past that guard
    module = load_script(script)
    for flag in ("--max_epochs", "--batch_size", "--save_every", "--dataset_size"):
        error = parse_fails(module, [flag, "0"], capsys)
        assert error.endswith(f"error: {flag} must be at least 1")


@pytest.mark.parametrize("script", TORCHRUN_STEPS)
def test_torchrun_step_started_by_python_says_how_to_start_it(script, monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(sys, "argv", [str(REPO / script)])
    assert parse_fails(load_script(script), [], capsys) == (
        f"{script}: error: use torchrun: torchrun --standalone --nproc-per-node 2 {script}")


@pytest.mark.parametrize("script,argv,message", [
    ("05_singlenode_cpu.py", ["--val_fraction", "1"], "--val_fraction must be between 0 and 1"),
    ("05_singlenode_cpu.py", ["--threads", "0"], "--threads must be at least 1"),
    ("06_amp.py", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ("02_multigpu_mp_spawn.py", ["--world_size", "0"], "--world_size must be at least 1"),
])
def test_step_specific_bad_values(script, argv, message, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert message in parse_fails(load_script(script), argv, capsys)


def test_port_in_use_is_named(tmp_path):
    """Step 02 listens on MASTER_PORT (default 12355); a busy one is named by PyTorch, and
    nothing hangs."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run([sys.executable, REPO / "02_multigpu_mp_spawn.py", "--max_epochs", "1"],
                   cwd=tmp_path, env=cpu_env(MASTER_PORT=port), check=False, timeout=120)
    assert proc.returncode != 0
    assert f"port: {port}" in proc.stderr and "address already in use" in proc.stderr


def fake_gpus(monkeypatch, count: int):
    """Make torch believe this machine has `count` CUDA GPUs (the rule asks only these two)."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device("cuda") if count else None)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)


@pytest.mark.parametrize("script", ["02_multigpu_mp_spawn.py", *TORCHRUN_STEPS])
@pytest.mark.parametrize("gpus,processes,expected", [
    (0, 2, ("cpu", "gloo")),   # a laptop
    (1, 1, ("cuda", "nccl")),  # a hosted notebook, one process
    (1, 2, ("cpu", "gloo")),   # a hosted notebook asked for two processes: both on the CPU
    (4, 4, ("cuda", "nccl")),  # a multi-GPU box
    (4, 2, ("cuda", "nccl")),
    (4, 8, ("cpu", "gloo")),   # more processes than GPUs
])
def test_device_plan_with_faked_gpu_count(monkeypatch, script, gpus, processes, expected):
    """(minGPT-ddp's rule, the same, is tested with its machine description: test_machines.py.)"""
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
    """One process per GPU where there are two or more; else two (on the CPU, by the rule)."""
    step = load_script("02_multigpu_mp_spawn.py")
    fake_gpus(monkeypatch, gpus)
    assert step.parse_args([]).world_size == default_world_size


@pytest.mark.parametrize("use_libuv", ["0", "1"])
def test_use_libuv_reaches_the_store(monkeypatch, use_libuv):
    """The advice for systems without libuv (USE_LIBUV=0, TROUBLESHOOTING.md) is true for the
    store the torchrun steps build (plumbing.restart_safe_store, through env://) and for
    minGPT-ddp's; a dist.TCPStore built by hand would not read it."""
    monkeypatch.setenv("USE_LIBUV", use_libuv)
    for name, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    import plumbing  # beside the steps
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    store = plumbing.restart_safe_store("gloo", timedelta(seconds=20))["store"]
    assert store.underlying_store.libuvBackend == (use_libuv == "1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.syspath_prepend(str(REPO / "minGPT-ddp"))
    found = load_script("minGPT-ddp/ddp_setup.py").store_for_this_attempt(timedelta(seconds=20))
    store = found[0] if isinstance(found, tuple) else found
    assert store.underlying_store.libuvBackend == (use_libuv == "1")
