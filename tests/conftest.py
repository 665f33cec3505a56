"""Shared helpers for the tests.

Every test that needs several processes starts them for real (gloo on CPU) as
subprocesses, exactly as a learner would from the shell. Nothing in
torch.distributed is mocked.
"""
import importlib.util
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


# A minGPT-ddp small enough to train a few dozen steps in seconds on one core per rank.
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=8",
            "trainer.eval_iters=4", "trainer.warmup_iters=5", "trainer.log_interval=5", "trainer.eval_interval=10"]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it), so parallel tests never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """Environment for a worker: CPU only, one thread per process (this machine has 2 cores)."""
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a worker that dies of a signal prints every thread's Python stack first.
    # MASTER_PORT: step 02 (mp.spawn) listens there; a free one, so that tests never collide.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1",
               MASTER_PORT=str(free_port()))
    env.update({k: str(v) for k, v in extra.items()})
    return env


# A PyTorch bug at interpreter exit, not ours (no public PyTorch issue found that matches; see README, troubleshooting): a Gloo worker thread
# can drop its last reference to a tensor of the final collective after Python began shutting down;
# Python then ends that thread and C++ aborts (SIGABRT) although training finished and every file
# was written. Not rare: 2 of 30 runs of step 06 on 2 processes; the scripts' barrier before
# destroy_process_group makes it much rarer, not impossible.
EXIT_ABORT = "terminate called without an active exception"


def aborted_only_at_exit(proc) -> bool:
    """True for that crash alone: the run printed its last line, and every process that failed was aborted
    by it (SIGABRT, exit code -6) or stopped by torchrun because of it (SIGTERM, -15)."""
    final_report = proc.stderr.rsplit("ChildFailedError", 1)[-1]  # torchrun's report on its last attempt
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", final_report))
    finished = "Finished training" in proc.stdout or "] Done: " in proc.stdout  # step 04 trains nothing
    return (EXIT_ABORT in proc.stderr and finished
            and "-6" in codes and codes <= {"-6", "-15"})


def run(cmd, cwd, timeout=180, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a command, capture its output; on an unexpected exit code fail with the output shown."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env or cpu_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0 and aborted_only_at_exit(proc):
        warnings.warn(f"a process aborted after training had finished (PyTorch/Gloo exit crash, "
                      f"see README, troubleshooting): {' '.join(cmd)}")
        return proc
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc, script, *args, standalone=True, extra=()):
    """The command line `torchrun --standalone --nproc-per-node N SCRIPT ARGS` (free rendezvous port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if standalone:
        cmd.append("--standalone")
    cmd += [*extra, "--nproc-per-node", str(nproc), str(REPO / script), *args]
    return cmd


def start_nodes(folders, args, extra=(), timeout=180) -> list:
    """Torchrun "nodes" on this machine, one process each, meeting through c10d rendezvous on 127.0.0.1; node i
    works in folders[i] (its own disk). Returns each node's CompletedProcess once all have ended; a hang fails."""
    port = free_port()
    procs = []
    for node_rank, folder in enumerate(folders):
        cmd = torchrun(1, *args, standalone=False,
                       extra=["--nnodes", len(folders), "--node-rank", node_rank, "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
                              "--local-addr", "127.0.0.1", *extra])
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=folder, env=cpu_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
    try:
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        return results
    finally:
        for proc in procs:
            proc.kill()


def load_script(filename: str):
    """Import a numbered step script (its name starts with a digit, so `import` can't) as a module."""
    path = REPO / filename
    name = "step_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# minGPT-ddp's modules have plain names (model, trainer, ...) that another folder's tests
# may use too: import ours fresh and put back whatever was there afterwards.
MINGPT_MODULES = ("model", "char_dataset", "config", "trainer", "ddp_setup", "mfu", "snapshot")


@pytest.fixture(scope="module")
def mingpt():
    """minGPT-ddp's model, char_dataset and config modules, imported in this process."""
    saved = {name: sys.modules.pop(name) for name in MINGPT_MODULES if name in sys.modules}
    sys.path.insert(0, str(REPO / "minGPT-ddp"))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in ("model", "char_dataset", "config")})
    finally:
        sys.path.remove(str(REPO / "minGPT-ddp"))
        for name in MINGPT_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture
def repo() -> Path:
    return REPO
