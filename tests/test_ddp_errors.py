"""notebooks/ddp_errors.py: each classic DDP error really happens with the message a learner reads
in the notebook and the README, each fix really runs, and nothing hangs. Every run starts 2 real
Gloo processes; nothing is mocked.

Notebook 07 is the one place the three errors and their fixes run (10 runs, conftest's
executed_notebook: once per session, in quick mode, shared with test_notebooks); the tests here
assert on the lines it printed. The notebook itself asserts each run's exit codes and headline
message. Run here: only what the notebook does not run (the parent's deadline, the other side of
`--at_end exit`); flags are checked in this process."""

import re
import sys

import pytest
import torch

from conftest import REPO, cpu_env, load_script, run, stream_text

SCRIPT = REPO / "notebooks" / "ddp_errors.py"
# a process-group timeout the runs below must NOT wait for: they have to fail for another reason
SLOW_S = 60


def tag(rank) -> str:
    return f"[cpu rank {rank}]"


@pytest.fixture(scope="module")
def notebook_runs(executed_notebook) -> dict:
    """Notebook 07's runs of ddp_errors.py: {(environment, flags): everything its cell printed}."""
    runs = {}
    for cell in executed_notebook("07_ddp_errors.ipynb").nb.cells:
        text = stream_text(cell)
        command = re.match(r"\$ (.*?)python notebooks/ddp_errors.py (.*)", text)
        if command:
            runs[(command.group(1).strip(), command.group(2).strip())] = text
    return runs


def output(runs, flags, env=""):
    assert (env, flags) in runs, f"notebook 07 ran no `{env} python ... {flags}`: {list(runs)}"
    return runs[(env, flags)]


# What each broken run must print: the error's words, and where each rank was when it failed.
TIMEOUT = "5000ms"  # the script's default process-group timeout (5 s), as Gloo prints it
BROKEN = {
    "unused": [
        f"{tag(0)} step 0 | loss",
        f"{tag(1)} step 0 | loss",
        f"{tag(0)} RuntimeError after",
        f"{tag(1)} RuntimeError after",
        "in train_step(), at `loss = F.mse_loss(model(x), y)`",
        "Expected to have finished reduction in the prior iteration before starting a new one",
        "Parameter indices which did not receive grad for rank 0: 4 5",
        "Parameter indices which did not receive grad for rank 1: 4 5",
    ],
    # rank 0 ran out of data and waits in the final barrier; rank 1 waits in its 4th backward's
    # all-reduce
    "uneven": [
        f"{tag(0)} out of data after 3 steps",
        f"{tag(1)} step 2 | loss",
        f"Timed out waiting {TIMEOUT} for recv operation to complete",
        f"{tag(1)} RuntimeError after",
        "in train_step(), at `loss.backward()`",
        f"{tag(0)} RuntimeError after",
        "in worker(), at `dist.barrier()`",
    ],
    # rank 0 alone calls all_reduce; rank 1 waits in the final barrier
    "partial": [
        f"Timed out waiting {TIMEOUT} for recv operation to complete",
        f"{tag(0)} RuntimeError after",
        "in partial(), at `dist.all_reduce(total)`",
        f"{tag(1)} RuntimeError after",
        "in worker(), at `dist.barrier()`",
    ],
}


@pytest.mark.parametrize("error", ["unused", "uneven", "partial"])
def test_the_error_happens_with_its_message(notebook_runs, error):
    out = output(notebook_runs, f"--error {error}")
    assert "ddp_errors: exit codes rank 0 1, rank 1 1" in out
    missing = [line for line in BROKEN[error] if line not in out]
    assert not missing, f"missing {missing} in:\n{out}"
    assert (
        "killed after" not in out
    )  # the error (or the timeout) ended them, not the parent's deadline


FIXED = {
    "unused": [
        f"{tag(0)} aux.weight.grad is None | weights the same on every rank: True",
        f"{tag(1)} aux.weight.grad is None | weights the same on every rank: True",
        f"{tag(1)} step 2 | loss",
    ],
    "uneven": [
        f"{tag(0)} out of data after 3 steps",
        f"{tag(1)} out of data after 5 steps",
        f"{tag(1)} step 4 | loss",
        f"{tag(0)} weights the same on every rank: True",
        f"{tag(1)} weights the same on every rank: True",
    ],
    "partial": [f"{tag(0)} mean validation loss over the ranks"],
}


@pytest.mark.parametrize("error", sorted(FIXED))
def test_the_fix_runs(notebook_runs, error):
    out = output(notebook_runs, f"--error {error} --fix")
    assert "ddp_errors: exit codes rank 0 0, rank 1 0" in out
    missing = [
        line
        for line in FIXED[error] + [f"{tag(0)} finished after", f"{tag(1)} finished after"]
        if line not in out
    ]
    assert not missing, f"missing {missing} in:\n{out}"
    assert "Error" not in out


def test_each_rank_logs_how_it_ended(notebook_runs, executed_notebook):
    """--log_file: one JSON line per rank, read back for the notebook's table of all runs (label,
    each rank)."""
    text = "".join(stream_text(cell) for cell in executed_notebook("07_ddp_errors.ipynb").nb.cells)
    rows = {
        line[:24].strip(): re.findall(r"rank (\d) (\w+) after", line)
        for line in text.splitlines()
        if re.match(r"\S.{24}rank 0 (failed|finished) after", line)
    }
    assert rows["partial --fix"] == [("0", "finished"), ("1", "finished")]
    assert rows["uneven --at_end exit"] == [("0", "finished"), ("1", "failed")]
    assert rows["unused"] == [("0", "failed"), ("1", "failed")]


def test_a_rank_that_exits_fails_the_waiting_one_at_once(notebook_runs):
    """The other side of b): if the rank that is done exits instead of waiting, the rank still in a
    collective fails at once (its peer's connection is gone), not by the timeout."""
    out = output(notebook_runs, "--error uneven --at_end exit")
    assert "exit codes rank 0 0, rank 1 1" in out and f"{tag(1)} RuntimeError after" in out
    assert (
        "by peer" in out and "Timed out" not in out
    )  # "Connection closed by peer" or "... reset by peer"


def test_the_same_for_a_partial_collective(tmp_path):
    """... and of c), which the notebook does not run: rank 1 exits, rank 0 waits in its all_reduce.
    With a 60 s timeout, a failure that names the peer cannot be the timeout."""
    proc = run(
        [sys.executable, SCRIPT, "--error", "partial", "--at_end", "exit", "--timeout_s", SLOW_S],
        cwd=tmp_path,
        env=cpu_env(),
        timeout=150,
        check=False,
    )
    assert proc.returncode == 1
    assert "exit codes rank 0 1, rank 1 0" in proc.stdout, proc.stdout
    assert (
        f"{tag(0)} RuntimeError after" in proc.stdout
        and "in partial(), at `dist.all_reduce(total)`" in proc.stdout
    )
    assert "by peer" in proc.stdout and "Timed out" not in proc.stdout, proc.stdout


def test_detail_names_the_mismatched_collectives_at_once(notebook_runs):
    out = output(notebook_runs, "--error partial", env="TORCH_DISTRIBUTED_DEBUG=DETAIL")
    assert out.count("Detected mismatch between collectives on ranks") == 2, out
    assert (
        "Rank 0 is running collective: CollectiveFingerPrint(SequenceNumber=0, OpType=ALLREDUCE"
        in out
    )
    assert (
        "Rank 1 is running collective: CollectiveFingerPrint(SequenceNumber=0OpType=BARRIER)" in out
    )
    assert "Timed out" not in out


def test_info_names_the_unused_parameters(notebook_runs):
    out = output(notebook_runs, "--error unused", env="TORCH_DISTRIBUTED_DEBUG=INFO")
    assert "ddp_errors: exit codes rank 0 1, rank 1 1" in out
    for rank in (0, 1):
        assert f"Parameters which did not receive grad for rank {rank}: aux.bias, aux.weight" in out


@pytest.mark.skipif(
    not torch.__version__.startswith("2.13.") or torch.cuda.is_available(),
    reason="what the notebook and the README say about DETAIL and DDP: seen with torch 2.13, CPU",
)
def test_detail_crashes_the_ddp_constructor_in_torch_2_13(notebook_runs):
    """The notebook and the README warn: DETAIL with a DDP model crashes (SIGSEGV) in torch 2.13 on
    CPU. When a PyTorch release fixes it, this fails: then drop the warning."""
    out = output(notebook_runs, "--error unused --fix", env="TORCH_DISTRIBUTED_DEBUG=DETAIL")
    assert "exit codes rank 0 -11 (SIGSEGV), rank 1 -11 (SIGSEGV)" in out, out


def test_the_deadline_kills_what_the_timeout_does_not_end(tmp_path):
    """The last resort: with a timeout longer than the deadline, the parent kills both waiting
    ranks."""
    proc = run(
        [sys.executable, SCRIPT, "--error", "uneven", "--timeout_s", 120, "--deadline_s", 4],
        cwd=tmp_path,
        env=cpu_env(),
        timeout=90,
        check=False,
    )
    assert proc.returncode == 1
    assert "killed after the 4 s deadline: ranks [0, 1]" in proc.stdout, proc.stdout
    assert "exit codes rank 0 -9 (SIGKILL), rank 1 -9 (SIGKILL)" in proc.stdout


@pytest.fixture
def ddp_errors(monkeypatch):
    """The script's module, imported here; argparse names the program after sys.argv[0], as from the
    shell."""
    monkeypatch.setattr(sys, "argv", ["ddp_errors.py"])
    return load_script("notebooks/ddp_errors.py")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--error", "nope"], "argument --error: invalid choice: 'nope'"),
        (["--error", "unused", "--world_size", "1"], "--world_size must be at least 2"),
        (
            ["--error", "unused", "--timeout_s", "0"],
            "--timeout_s and --deadline_s must be positive",
        ),
        (
            ["--error", "unused", "--deadline_s", "-1"],
            "--timeout_s and --deadline_s must be positive",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(ddp_errors, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        ddp_errors.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse: the usage (which may wrap), then one line with the error
    assert err[-1].startswith("ddp_errors.py: error: ") and message in err[-1], err
    assert err[0].startswith("usage: ddp_errors.py") and not any(
        "Traceback" in line for line in err
    )


def test_help_lists_the_three_errors(ddp_errors, capsys):
    with pytest.raises(SystemExit) as exit_:
        ddp_errors.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "{partial,uneven,unused}" in out and "--fix" in out
