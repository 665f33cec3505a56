"""The harness itself (tests/conftest.py), in-process or with plain Python children: the exit
check fails a process that leaves Gloo's threads running (and only that one), a command past its
time limit is ended with every descendant, and a clash on a port the harness chose is retried once
on another port, never on a port the test chose itself."""

import os
import socket
import sys
import time

import pytest

import conftest
from conftest import cpu_env, exit_checked_env, free_port, run

@pytest.mark.timeout(
    30
)  # a harness that waits for the grandchild's pipe hangs: fail in 30 s, not 600
def test_a_command_past_its_limit_is_killed_with_its_descendants(tmp_path):
    """The child starts a grandchild in a session of its own (as torchrun starts its workers)."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "                     start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(AssertionError, match=r"(?s)still running after 2 s.*started"):
        run([sys.executable, "-c", script], cwd=tmp_path, timeout=2)
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed; a zombie until init reaps it
        if (
            not os.path.exists(f"/proc/{grandchild}")
            or " Z " in open(f"/proc/{grandchild}/stat").read()
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still running")


BIND_MASTER_PORT = (
    "import os, socket\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['MASTER_PORT'])))\n"
    "print('bound', os.environ['MASTER_PORT'])\n"
)


def test_a_clash_on_a_port_the_harness_chose_is_retried_once(tmp_path, monkeypatch):
    monkeypatch.setitem(conftest.TOLERATED, "port retries", [])
    port = free_port()
    with socket.socket() as busy:  # someone else takes it between the choice and the child's bind
        busy.bind(("127.0.0.1", port))
        proc = run(
            [sys.executable, "-c", BIND_MASTER_PORT], cwd=tmp_path, env=cpu_env(MASTER_PORT=port)
        )
    assert proc.stdout.startswith("bound ") and proc.stdout.split()[1] != str(port)
    assert len(conftest.TOLERATED["port retries"]) == 1


def test_a_clash_on_a_port_the_test_chose_is_not_retried(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = run(
            [sys.executable, "-c", BIND_MASTER_PORT],
            cwd=tmp_path,
            env=cpu_env(MASTER_PORT=port),
            check=False,
        )
    assert proc.returncode == 1 and "Address already in use" in proc.stderr


# One process, a Gloo group of one, a DDP model: what every step does, in 12 lines.
TEARDOWN = """
import sys, torch, torch.distributed as dist
if sys.argv[1] == "fixed":
    import torch.distributed.nn  # before init: its default arguments then do not hold the group
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
total = torch.ones(3)
dist.all_reduce(total)  # a Python tensor in Gloo's hands, as the steps' validation sum
if sys.argv[1] == "fixed":
    del model  # DDP holds the group too
dist.destroy_process_group()
print("finished", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the exit check reads /proc")
@pytest.mark.parametrize("teardown", ["as-the-steps-do", "fixed"])
def test_the_exit_check_fails_a_process_that_leaves_gloos_threads_running(tmp_path, teardown):
    """exit_checked_env() (tools/exit_abort/starve in strict mode), which the step tests use: the
    teardown without the fix (the model alive, torch.distributed.nn imported by DDP after init)
    leaves Gloo's threads running after destroy_process_group() and fails there with exit 86 every
    time; the fixed one exits 0."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    done = run([sys.executable, script, teardown if teardown == "fixed" else "plain", free_port()],
               cwd=tmp_path, timeout=120, env=exit_checked_env(), check=False)
    if teardown == "fixed":
        assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]
    else:
        assert done.returncode == 86, done.stderr[-2000:]
        assert "finished" not in done.stdout
        assert ("Gloo worker thread(s) still running after destroy_process_group()"
                in done.stderr), done.stderr[-2000:]
