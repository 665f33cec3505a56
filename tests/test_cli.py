"""Every step script explains itself with --help and turns bad input into one clear line and a non-zero exit."""
import socket
import sys

import pytest

from conftest import REPO, run

STEPS = sorted(p.name for p in REPO.glob("0[0-9]_*.py"))


@pytest.mark.parametrize("script", STEPS)
def test_help(tmp_path, script):
    proc = run([sys.executable, REPO / script, "--help"], cwd=tmp_path)
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout


def last_error_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["01_single_gpu.py", "02_multigpu_mp_spawn.py"])
def test_bad_flag_values(tmp_path, script):
    proc = run([sys.executable, REPO / script, "--max_epochs", "0"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert last_error_line(proc).endswith("error: --max_epochs must be at least 1")


def test_port_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run([sys.executable, REPO / "02_multigpu_mp_spawn.py", "--master_port", port], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2
    assert f"port {port} is already in use" in last_error_line(proc)


def test_torchrun_script_says_how_to_start_it(tmp_path):
    proc = run([sys.executable, REPO / "03_multigpu_torchrun.py"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert last_error_line(proc) == ("error: start this script with torchrun, e.g. "
                                     "torchrun --standalone --nproc-per-node 2 03_multigpu_torchrun.py")
