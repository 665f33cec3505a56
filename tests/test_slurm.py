"""The Slurm launchers on a real Slurm cluster: slurm/local_cluster.sh starts one on this machine.

Two emulated nodes (two slurmd daemons on this host), real sbatch submissions of
slurm/sbatch_run.sh and minGPT-ddp/slurm/sbatch_run.sh, real torchrun rendezvous between the
nodes. Needs root (the cluster installs slurm-wlm with apt-get when it is missing and runs the
daemons as root); skipped otherwise, and when Slurm can't be installed (no network). With
REQUIRE_SLURM=1 (CI sets it in .ci/run) each of those reasons fails the tests instead: a runner
that cannot run them does not pass them.

Three jobs in all; where one job proves two things, two tests read it (module fixtures).
"""

import os
import re
import shutil
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import PORT_CLASH, REPO, TINY_GPT, cpu_env, free_port, note, run

CLUSTER = REPO / "slurm" / "local_cluster.sh"
STEP03_JOB = REPO / "slurm" / "sbatch_run.sh"
MINGPT_JOB = REPO / "minGPT-ddp" / "slurm" / "sbatch_run.sh"
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
JOB_TIMEOUT = 150  # seconds; each job here takes 5-20 s on 2 cores
REQUIRED = os.environ.get("REQUIRE_SLURM") == "1"

# Installing Slurm (about 15 s) and the jobs fit well inside this; pytest.ini's 600 s stays the
# outer bound.
pytestmark = pytest.mark.timeout(420)


def cannot_run(reason):
    """Skip the Slurm tests, or with REQUIRE_SLURM=1 fail them: CI must not pass what never ran."""
    if REQUIRED:
        pytest.fail(f"REQUIRE_SLURM=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def three_free_ports() -> int:
    """A port P such that P, P+1 and P+2 are free now: slurmctld and the two slurmd daemons. (Not
    free_port(): the cluster fixture, not run(), starts the cluster again after a clash.)"""
    for _ in range(50):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
            for port in (base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:  # (base + 2 past 65535 included)
            continue
    raise AssertionError("found no three consecutive free ports")


def slurm_env(**extra) -> dict:
    """cpu_env without any SLURM_* variable of a job this test may itself run in, plus `extra`."""
    env = {k: v for k, v in cpu_env().items() if not k.startswith("SLURM_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def daemon_pids(state):
    return {f.name: int(f.read_text()) for f in state.glob("*.pid")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running local cluster with its own state directory and ports; stopped at the end, whatever
    happens.

    Returns the environment for Slurm commands (SLURM_CONF points at the cluster's slurm.conf)."""
    if os.geteuid() != 0:
        cannot_run(
            "the local Slurm cluster needs root (apt-get install slurm-wlm, daemons run as root)"
        )
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        cannot_run("Slurm is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm") / "state"
    env = slurm_env(SLURM_LOCAL_DIR=state, SLURM_LOCAL_PORT=three_free_ports(), SLURM_LOCAL_CPUS=2)
    pids = {}
    try:
        proc = run(["bash", CLUSTER, "start"], cwd=REPO, env=env, timeout=360, check=False)
        if proc.returncode == 1 and PORT_CLASH.search(proc.stderr):  # taken since we chose them
            note("port retries", f"local Slurm cluster on {env['SLURM_LOCAL_PORT']}: {proc.stderr}")
            run(["bash", CLUSTER, "stop"], cwd=REPO, env=env, timeout=120, check=False)
            env["SLURM_LOCAL_PORT"] = str(three_free_ports())
            proc = run(["bash", CLUSTER, "start"], cwd=REPO, env=env, timeout=360, check=False)
        pids = daemon_pids(state)
        if proc.returncode == 3:
            cannot_run(f"Slurm could not be installed: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, f"local_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        assert "n1 and n2 idle" in proc.stdout
        conf = state / "slurm.conf"
        assert f"export SLURM_CONF={conf}" in proc.stdout
        yield slurm_env(SLURM_CONF=conf, SLURM_LOCAL_DIR=state)
    finally:
        run(["bash", CLUSTER, "stop"], cwd=REPO, env=env, timeout=120, check=False)
        # Nothing of it is left: every daemon it recorded has exited.
        left = [f"{name}={pid}" for name, pid in pids.items() if os.path.exists(f"/proc/{pid}")]
        assert not left, f"local_cluster.sh stop left daemons running: {left}"


def submit(env, script, workdir, *args, **extra_env) -> int:
    """sbatch from the repository root (the submit directory), with the job working in `workdir`."""
    env = {**env, **{k: str(v) for k, v in extra_env.items()}}
    proc = run(
        ["sbatch", "--parsable", "--chdir", workdir, script, *args], cwd=REPO, env=env, timeout=30
    )
    return int(proc.stdout.strip().split(";")[0])


def job_field(env, job_id, field):
    out = run(["scontrol", "show", "job", job_id], cwd=REPO, env=env, timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else None


def wait(env, job_id, workdir) -> tuple:
    """Poll `scontrol show job` until the job has ended (sbatch --wait returns slowly).

    Returns (state, output). On timeout the job is cancelled and the test fails with its output.
    """
    output_file = workdir / f"slurm-{job_id}.out"
    deadline = time.monotonic() + JOB_TIMEOUT
    state = None
    while time.monotonic() < deadline:
        state = job_field(env, job_id, "JobState")
        if state in DONE:
            break
        time.sleep(1)
    else:
        run(["scancel", job_id], cwd=REPO, env=env, check=False)
        output = output_file.read_text() if output_file.exists() else "(no output file)"
        pytest.fail(
            f"job {job_id} still {state} after {JOB_TIMEOUT} s; cancelled. "
            f"Its output:\n{output[-4000:]}"
        )
    return state, output_file.read_text()


def job(env, script, workdir, *args, **extra_env) -> tuple:
    """Submit, wait; returns (job id, state, output). A job that failed because its rendezvous port
    was taken (by another program, after the job or the test chose it) is submitted once more: with
    a new RDZV_PORT where the test chose one, else with a new job id (the batch scripts derive the
    port from it)."""
    job_id = submit(env, script, workdir, *args, **extra_env)
    state, output = wait(env, job_id, workdir)
    if state != "COMPLETED" and PORT_CLASH.search(output):
        note("port retries", f"Slurm job {job_id}: {output[-300:]}")
        if "RDZV_PORT" in extra_env:
            extra_env["RDZV_PORT"] = free_port()
        job_id = submit(env, script, workdir, *args, **extra_env)
        state, output = wait(env, job_id, workdir)
    return job_id, state, output


def test_local_cluster_has_two_idle_nodes_and_starts_only_once(cluster):
    proc = run(["bash", CLUSTER, "start"], cwd=REPO, env=cluster, timeout=60)
    assert "already running" in proc.stdout
    proc = run(["bash", CLUSTER, "status"], cwd=REPO, env=cluster, timeout=60)
    assert "The local Slurm cluster is running" in proc.stdout
    nodes = run(["sinfo", "-h", "-N", "-o", "%N %t %c"], cwd=REPO, env=cluster).stdout.splitlines()
    assert sorted(nodes) == ["n1 idle 2", "n2 idle 2"], proc.stdout


def test_step03_on_two_nodes(cluster, tmp_path):
    """The defaults: 2 nodes x 2 CPU processes, rendezvous on the first node, port from the job id.
    """
    job_id, state, output = job(
        cluster,
        STEP03_JOB,
        tmp_path,
        "--max_epochs",
        2,
        "--dataset_size",
        256,
        "--batch_size",
        16,
        "--snapshot_path",
        tmp_path / "snapshot.pt",
    )
    assert state == "COMPLETED", output[-4000:]
    assert job_field(cluster, job_id, "NodeList") == "n[1-2]"
    # the emulated nodes' address is 127.0.0.1 (NodeAddr), so the rendezvous is there too
    assert (
        f"job {job_id} | nodes n[1-2] (2) | rendezvous 127.0.0.1:{20000 + job_id % 12000} | "
        f"device cpu | "
        f"processes per node 2 | working directory {tmp_path}"
    ) in output
    assert "[cpu rank 0] device cpu | backend gloo | world_size 4 | GPUs here 0" in output
    for rank in range(4):  # every rank of both nodes trained both epochs
        assert f"[cpu rank {rank}] Epoch 1 | Batchsize 16 | Steps 4 |" in output, output
    assert "[cpu rank 0] Finished training: 2 epochs" in output
    assert torch.load(tmp_path / "snapshot.pt", weights_only=True)["epochs_run"] == 2


@pytest.fixture(scope="module")
def mingpt_job(cluster, tmp_path_factory):
    """minGPT-ddp on two nodes, with the environment's overrides (one process per node, rendezvous
    address and port given); the last rank crashes at step 15 (injected from outside by
    tools/mingpt_faults.py, once), and MAX_RESTARTS=1 lets torchrun restart both nodes'
    processes."""
    folder = tmp_path_factory.mktemp("mingpt_job")
    port = free_port()
    _, state, output = job(
        cluster,
        MINGPT_JOB,
        folder,
        "--crash-at-step",
        15,
        *TINY_GPT,
        "trainer.max_iters=20",
        f"trainer.snapshot_path={folder / 'gpt.pt'}",
        f"trainer.log_file={folder / 'gpt.jsonl'}",
        DEVICE="cpu",
        NPROC_PER_NODE=1,
        RDZV_HOST="127.0.0.1",
        RDZV_PORT=port,
        LOCAL_ADDR="127.0.0.1",
        MAX_RESTARTS=1,
        TRAIN_SCRIPT="tools/mingpt_faults.py",
    )
    assert state == "COMPLETED", output[-4000:]
    return SimpleNamespace(folder=folder, output=output, port=port)


def test_mingpt_on_two_nodes(mingpt_job):
    output, folder = mingpt_job.output, mingpt_job.folder
    assert f"rendezvous 127.0.0.1:{mingpt_job.port} | device cpu | processes per node 1 |" in output
    assert (
        "[cpu rank 0] device cpu | backend gloo | world_size 2 | GPUs here 0 | 1 thread(s) per rank"
        in output
    )
    # both ranks loaded the same data (each attempt: one line per rank), the same fingerprint
    fingerprints = re.findall(r"\[cpu rank (\d)\] data .* fingerprint (\w+)", output)
    assert sorted(set(r for r, _ in fingerprints)) == ["0", "1"], output
    assert len({f for _, f in fingerprints}) == 1, output
    assert re.search(
        r"\[cpu rank 0\] Finished training: steps \d+-20 \| val loss [\d.]+ \| [\d.]+ s \| "
        r"snapshot "
        + re.escape(str(folder / "gpt.pt")),
        output,
    ), output
    assert '"iter": 20' in (folder / "gpt.jsonl").read_text()


def test_mingpt_job_restarted_after_a_crash_resumes(mingpt_job):
    """The trainer.resume=auto that the batch script passes makes the restarted processes continue
    from the snapshot of step 10 instead of starting over."""
    snapshot, output = mingpt_job.folder / "gpt.pt", mingpt_job.output
    assert "simulated crash of rank 1 at step 15" in output, output[-4000:]
    assert f"resuming from {snapshot} at step 10" in output, output[-4000:]
    assert "Finished training: steps 10-20" in output
    assert torch.load(snapshot, weights_only=True)["step"] == 20


@pytest.fixture(scope="module")
def gpu_job(cluster, tmp_path_factory):
    """A job given 3 GPUs (faked through CUDA_VISIBLE_DEVICES, as Slurm sets it) whose script fails
    at once on a bad argument (this machine has no GPU to train on)."""
    folder = tmp_path_factory.mktemp("gpu_job")
    _, state, output = job(
        cluster, STEP03_JOB, folder, "--max_epochs", 0, CUDA_VISIBLE_DEVICES="0,1,2"
    )
    return SimpleNamespace(state=state, output=output)


def test_gpus_come_from_the_job_not_from_the_node(gpu_job):
    """DEVICE=auto counts the GPUs Slurm gave the job and starts one process per GPU; with more
    processes than --cpus-per-task it warns."""
    assert "| device gpu | processes per node 3 |" in gpu_job.output, gpu_job.output
    assert "warning: 3 processes per node share 2 core(s) (--cpus-per-task 2)" in gpu_job.output
    # without GPUs (CUDA_VISIBLE_DEVICES empty): test_step03_on_two_nodes, "device cpu | processes
    # per node 2"


def test_failing_training_fails_the_job(gpu_job):
    """A bad argument stops the script on every node: the job ends FAILED (no hang) and says why."""
    assert gpu_job.state == "FAILED"
    assert "--max_epochs must be at least 1" in gpu_job.output


def test_batch_scripts_refuse_to_run_outside_slurm(tmp_path):
    env = slurm_env()
    for script in (STEP03_JOB, MINGPT_JOB):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        proc = run([script], cwd=REPO, env=env, check=False)
        assert proc.returncode == 1
        assert "submit it with sbatch" in proc.stderr


def test_local_cluster_help():
    proc = run(["bash", CLUSTER, "--help"], cwd=REPO, timeout=30)
    assert "start" in proc.stdout and "stop" in proc.stdout and "SLURM_CONF" in proc.stdout
    proc = run(["bash", CLUSTER, "nonsense"], cwd=REPO, timeout=30, check=False)
    assert proc.returncode == 1 and "local_cluster.sh start" in proc.stderr
