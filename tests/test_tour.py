"""The tour's plan on the machines a workshop meets, with a faked GPU count: what runs where, and that every
command it would show names a script that exists. (The tour itself runs in `make tour`, not in the tests.)"""
import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("tour", REPO / "tools" / "tour.py")
tour = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tour)


def nprocs(steps):
    return {cmd[cmd.index("--nproc-per-node") + 1] for _, _, cmd, _, _ in steps if "--nproc-per-node" in cmd}


@pytest.mark.parametrize("gpus,expected_nproc", [(0, {"2"}), (1, {"2", "1"}), (4, {"4"}), (8, {"8"})])
def test_processes_per_step(gpus, expected_nproc):
    assert nprocs(tour.tour_steps(gpus)) == expected_nproc


def test_one_gpu_runs_fp16_on_it_and_the_rest_on_cpu_processes():
    """On one GPU the multi-process steps start 2 processes, which the steps' device rule puts on the CPU; a
    one-process fp16 run of step 06 uses the GPU."""
    steps = tour.tour_steps(1)
    gpu_runs = [cmd for _, _, cmd, _, _ in steps if "--nproc-per-node" in cmd and
                cmd[cmd.index("--nproc-per-node") + 1] == "1"]
    assert gpu_runs == [["torchrun", "--standalone", "--nproc-per-node", "1", "06_amp.py", "--max_epochs", "3",
                         "--dtype", "fp16", "--log_file", "fp16.jsonl"]]
    assert "1 GPU" in tour.describe(1) and "CPU" in tour.describe(1)
    assert "fp16" not in " ".join(" ".join(cmd) for _, _, cmd, _, _ in tour.tour_steps(0))


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_every_command_names_existing_files(gpus):
    for _, _, command, _, _ in tour.tour_steps(gpus):
        for arg in command:
            if arg.endswith(".py"):
                assert (REPO / arg).is_file(), arg


def test_the_crash_is_injected_from_outside_the_lesson():
    (crash,) = [cmd for key, title, cmd, _, _ in tour.tour_steps(0) if "crash" in title]
    assert crash[crash.index("--max-restarts") + 1] == "1"
    assert crash.index("tools/faults.py") < crash.index("03_multigpu_torchrun.py")
    assert "DDP_STEPS" not in (REPO / "03_multigpu_torchrun.py").read_text()


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import cpu_env
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py")], cwd=tmp_path, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: gpu-check needs an NVIDIA GPU, and PyTorch sees none here (torch.cuda.is_available() is False)"]
