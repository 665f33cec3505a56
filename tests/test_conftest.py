"""The harness itself (tests/conftest.py), in-process or with plain Python children (no torch): the
exit-abort rule accepts exactly the abort after a finished run, a command past its time limit is
ended with every descendant, and a clash on a port the harness chose is retried once on another
port, never on a port the test chose itself."""

import os
import socket
import subprocess
import sys
import time

import pytest

import conftest
from conftest import aborted_only_at_exit, cpu_env, free_port, run

ABORT = "terminate called without an active exception\n"
TORCHRUN_REPORT = (
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    "[0]:\n  exitcode  : {0}\n[1]:\n  exitcode  : {1}\n"
)
SPAWN_ABORT = ("torch.multiprocessing.spawn.ProcessExitedException: "
               "process {0} terminated with signal SIGABRT\n")
FINISHED = "[cpu rank 0] Epoch 1 | loss 0.1\n[cpu rank 0] Finished training: 2 epochs\n"


def done(stdout, stderr, code=1):
    return subprocess.CompletedProcess(["step"], code, stdout, stderr)


@pytest.mark.parametrize(
    "stdout,stderr,accepted",
    [
        (
            FINISHED,
            ABORT + TORCHRUN_REPORT.format(-15, -6),
            True,
        ),  # torchrun: rank 1 aborted, rank 0 stopped
        (FINISHED, ABORT + SPAWN_ABORT.format(1), True),  # mp.spawn (steps 02, 04)
        (
            "[cpu rank 0] Done: 8 of 11 demos on world_size 2\n",
            ABORT + SPAWN_ABORT.format(0),
            True,
        ),  # step 04
        (
            FINISHED,
            ABORT + TORCHRUN_REPORT.format(1, -6),
            False,
        ),  # a rank failed for another reason
        (FINISHED, TORCHRUN_REPORT.format(-15, -6), False),  # SIGABRT without the C++ message
        (
            "[cpu rank 0] Epoch 1 | loss 0.1\n",
            ABORT + SPAWN_ABORT.format(1),
            False,
        ),  # before it finished
        (
            "said: Finished training\n",
            ABORT + SPAWN_ABORT.format(1),
            False,
        ),  # not rank 0's last line
        (
            FINISHED,
            ABORT + SPAWN_ABORT.format(1) + "-- Process 0 terminated with the following error:\n",
            False,
        ),
    ],
    ids=[
        "torchrun",
        "spawn",
        "spawn-04",
        "other-failure",
        "no-message",
        "unfinished",
        "untagged",
        "raised",
    ],
)
def test_exit_abort_rule(stdout, stderr, accepted, monkeypatch):
    monkeypatch.setitem(conftest.TOLERATED, "exit aborts", [])  # these are not the suite's aborts
    proc = done(stdout, stderr)
    assert aborted_only_at_exit(proc) is accepted
    assert aborted_only_at_exit(proc) is accepted  # asked twice, counted once
    assert len(conftest.TOLERATED["exit aborts"]) == accepted
    merged = done(stdout + stderr, None)  # run(..., merge_output=True): one text
    assert aborted_only_at_exit(merged) is accepted


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
