"""Where is each rank stuck? notebooks/ddp_errors.py --error partial freezes 2 real Gloo ranks:
rank 0 waits in an all_reduce that rank 1 never calls, rank 1 waits in the barrier after it. The
stacks each rank shows must name the line it waits on, while it waits (before the process-group
timeout ends it):

* --show_stacks: the script asks its ranks itself (SIGUSR1, answered by faulthandler);
* under torchrun, the recipe of TROUBLESHOOTING.md on a real job: the workers are torchrun's
  children (pgrep -P), `kill -USR1` each; with --log-dir/--tee each rank's stack lands in its own
  log file; the timeout then ends the job, and @record puts each rank's exception into torchrun's
  error file; py-spy (requirements-dev.txt) dumps the same job from outside.

Two runs in all (one plain, one torchrun), every assert on them; each ends by its own timeout.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, run, torchrun

sys.path.insert(0, str(REPO / "tools"))
import proc  # noqa: E402  (tools/proc.py: ends a command's whole session, torchrun's workers too)

SCRIPT = REPO / "notebooks" / "ddp_errors.py"
TIMEOUT_S = 3  # process-group timeout of the --show_stacks run: stacks come within about 1 s
TORCHRUN_TIMEOUT_S = 4  # the torchrun run: time for pgrep and kill after the ranks' last line


def line_of(code: str) -> int:
    """The number of the one line of ddp_errors.py that is the statement `code` (comment aside)."""
    lines = SCRIPT.read_text().splitlines()
    found = [n for n, line in enumerate(lines, 1) if line.split("  #")[0].strip() == code]
    assert len(found) == 1, f"{code!r} on lines {found} of {SCRIPT}"
    return found[0]


ALL_REDUCE = line_of("dist.all_reduce(total)")  # rank 0 waits here: only it calls this all_reduce
BARRIER = line_of("dist.barrier()")  # rank 1 waits here, in the barrier before the end


def frame(line: int, function: str) -> str:
    """How faulthandler writes a frame of ddp_errors.py."""
    return f'ddp_errors.py", line {line} in {function}'


def tagged(output: str, tag: str) -> str:
    return "\n".join(line for line in output.splitlines() if line.startswith(tag))


def test_show_stacks_names_the_line_each_rank_waits_on(tmp_path):
    env = cpu_env()
    del env["PYTHONUNBUFFERED"]  # as in `python ... | tee`: the stacks must come while they wait
    done = run([sys.executable, SCRIPT, "--error", "partial", "--show_stacks",
                "--timeout_s", TIMEOUT_S], cwd=tmp_path, env=env, timeout=90, check=False)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    rank0, rank1 = tagged(out, "[cpu rank 0]"), tagged(out, "[cpu rank 1]")
    assert frame(ALL_REDUCE, "partial") in rank0, out
    assert frame(BARRIER, "worker") in rank1 and "in partial" not in rank1, out
    assert ("[cpu rank 0] waits in all_reduce(), called at line "
            f"{ALL_REDUCE} in partial(): dist.all_reduce(total)") in out
    assert ("[cpu rank 1] waits in barrier(), called at line "
            f"{BARRIER} in worker(): dist.barrier()") in out
    # Seen while they waited: the timeout ended both ranks after the stacks were printed.
    for rank in (0, 1):
        tag = f"[cpu rank {rank}]"
        assert out.index(f"{tag} waits in") < out.index(f"{tag} RuntimeError after"), out
    assert "ddp_errors: exit codes rank 0 1, rank 1 1" in out


def test_show_stacks_under_torchrun_is_refused_in_one_line(monkeypatch, capsys):
    """Under torchrun there is no parent to ask the ranks: one line says what to do instead."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = importlib.util.spec_from_file_location("ddp_errors", SCRIPT)
    ddp_errors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_errors)  # its `if __name__ == "__main__"` part does not run
    with pytest.raises(SystemExit) as exit_:
        ddp_errors.parse_args(["--error", "partial", "--show_stacks"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --show_stacks: only without torchrun (under it, use py-spy dump or kill" in last


@pytest.fixture(scope="module")
def stuck_torchrun_job(tmp_path_factory):
    """The torchrun job, asked for its stacks while both ranks wait: kill -USR1 to each worker (and
    py-spy, where installed), then left to its timeout. Returns what the tests read from it."""
    folder = tmp_path_factory.mktemp("stuck")
    cmd = torchrun(2, "notebooks/ddp_errors.py", "--error", "partial",
                   "--timeout_s", TORCHRUN_TIMEOUT_S, extra=["--log-dir", "logs", "--tee", "3"])
    job = subprocess.Popen([str(c) for c in cmd], cwd=folder, env=cpu_env(),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    py_spy = None
    try:
        # Each rank prints "my validation loss" right before its collective; its log file shows it.
        deadline = time.monotonic() + 90
        while not all("my validation loss" in log.read_text()
                      for log in folder.glob("logs/*/attempt_0/*/stdout.log")) or \
                len(list(folder.glob("logs/*/attempt_0/*/stdout.log"))) < 2:
            assert time.monotonic() < deadline and job.poll() is None, \
                "the ranks never reached their collective"
            time.sleep(0.1)
        time.sleep(0.5)  # from the print into the collective
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                 text=True).stdout.split()
        spy = shutil.which("py-spy",
                           path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if spy:
            py_spy = subprocess.run([spy, "dump", "--subprocesses", "--pid", str(job.pid)],
                                    capture_output=True, text=True, timeout=30)
        for pid in workers:
            os.kill(int(pid), signal.SIGUSR1)
        stdout, stderr = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            proc.end_session(job)
    logs = {int(rank_dir.name): rank_dir for rank_dir in folder.glob("logs/*/attempt_0/*")}
    return dict(returncode=job.returncode, stdout=stdout, stderr=stderr, workers=workers, logs=logs,
                py_spy=py_spy, folder=folder)


def test_kill_usr1_to_torchruns_workers_writes_each_ranks_stack_to_its_log(stuck_torchrun_job):
    job = stuck_torchrun_job
    assert len(job["workers"]) == 2, job["workers"]  # pgrep -P: torchrun's children are the ranks
    rank0, rank1 = (job["logs"][r].joinpath("stderr.log").read_text() for r in (0, 1))
    assert frame(ALL_REDUCE, "partial") in rank0, rank0
    assert frame(BARRIER, "worker") in rank1 and "in partial" not in rank1, rank1
    # --tee 3: torchrun's own stderr has them too, each line prefixed with the local rank
    assert f"[default0]:  File \"{SCRIPT}\", line {ALL_REDUCE} in partial" in job["stderr"], \
        job["stderr"]
    assert f"[default1]:  File \"{SCRIPT}\", line {BARRIER} in worker" in job["stderr"]


def test_record_puts_each_ranks_exception_into_torchruns_error_file(stuck_torchrun_job):
    job = stuck_torchrun_job
    assert job["returncode"] == 1, job["stderr"][-3000:]
    # where each rank's exception came out
    where = {0: (ALL_REDUCE, "partial"), 1: (BARRIER, "worker")}
    # Each rank times out (or sees its peer leave) and raises; @record writes the exception to the
    # file torchrun named in TORCHELASTIC_ERROR_FILE. A rank that torchrun stopped first (SIGTERM)
    # has none: at least one must be there.
    written = {rank: folder / "error.json" for rank, folder in job["logs"].items()
               if (folder / "error.json").exists()}
    assert written, f"no error.json in {job['logs']}"
    for rank, path in written.items():
        error = json.loads(path.read_text())["message"]
        assert error["message"].startswith("RuntimeError: "), error
        line, function = where[rank]
        assert f'ddp_errors.py", line {line}, in {function}' in \
            error["extraInfo"]["py_callstack"], error
    # torchrun's report: the first failure, read from that rank's error file (not
    # "error_file: <N/A>")
    root_cause = job["stderr"].split("Root Cause (first observed failure):", 1)[1]
    rank = int(re.search(r"rank\s*: (\d) \(local_rank", root_cause)[1])
    assert re.search(rf"error_file: logs/\S+/attempt_0/{rank}/error\.json", root_cause), root_cause
    line, function = where[rank]
    assert f'ddp_errors.py", line {line}, in {function}' in root_cause, root_cause
    assert "RuntimeError: " in root_cause


def test_py_spy_dumps_every_rank_of_the_torchrun_job(stuck_torchrun_job):
    spied = stuck_torchrun_job["py_spy"]
    if spied is None:
        pytest.skip("py-spy is not installed (requirements-dev.txt)")
    if spied.returncode != 0 and "Permission" in spied.stdout + spied.stderr:
        pytest.skip(f"py-spy may not read other processes here: {spied.stdout.strip()[:200]}")
    assert spied.returncode == 0, spied.stdout + spied.stderr
    # torchrun and its 2 workers
    processes = re.split(r"^Process \d+: ", spied.stdout, flags=re.MULTILINE)[1:]
    assert len(processes) == 3, spied.stdout
    assert any("all_reduce (torch/distributed/distributed_c10d.py" in p
               and f"partial (ddp_errors.py:{ALL_REDUCE})" in p for p in processes), spied.stdout
    assert any(f"worker (ddp_errors.py:{BARRIER})" in p and "partial (ddp_errors.py" not in p
               for p in processes), spied.stdout
