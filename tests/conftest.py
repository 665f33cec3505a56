"""Shared helpers for the tests.

Every test that needs several processes starts them for real (gloo on CPU) as
subprocesses, exactly as a learner would from the shell. Nothing in
torch.distributed is mocked.

Every command runs through tools/proc.py: in a session of its own, and past its time limit it is
ended with its whole session and every descendant (torchrun's workers run in sessions of their own).
"""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import proc as proc_tools  # noqa: E402  (tools/proc.py: ends its whole session on timeout)

# A minGPT-ddp small enough to train a few dozen steps in seconds on one core per rank.
TINY_GPT = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "trainer.batch_size=8",
    "trainer.eval_iters=4",
    "trainer.warmup_iters=5",
    "trainer.log_interval=5",
    "trainer.eval_interval=10",
]

# What the terminal summary reports (pytest_terminal_summary below): how often the suite needed a
# tolerance.
TOLERATED = {"port retries": []}


def note(kind: str, what: str):
    """Record one use of a tolerance, with the test that needed it, for the terminal summary."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    TOLERATED[kind].append(f"{test}: {' '.join(what.split())[:160]}")


# ---- Ports ---------------------------------------------------------------------------------------
# Where a child can bind port 0 itself, it does: `torchrun --standalone` picks its own rendezvous
# port. Where a port has to be chosen before the launch (mp.spawn's MASTER_PORT, a c10d endpoint
# shared by two torchrun "nodes", Slurm's RDZV_PORT), free_port() picks one that is free now;
# another process may take it before the child binds it (the child imports torch first: seconds).
# run() and start_nodes() then launch once more with new ports, but only for a clash on a port that
# free_port() handed out.
HANDED_OUT = set()
PORT_CLASH = re.compile(r"address already in use|EADDRINUSE", re.IGNORECASE)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it); see above for the window until it
    is bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    HANDED_OUT.add(port)
    return port


@pytest.fixture(autouse=True)
def _ports_of_this_test():
    """Only ports handed out for this test count as ours: a port another test used and released may
    come back from the OS to a socket this test binds on purpose (test_cli's busy port)."""
    HANDED_OUT.clear()


def ports_in(cmd, env) -> set:
    """The ports from free_port() that a command line or its environment names (whole numbers)."""
    texts = [str(c) for c in cmd] + [str(v) for v in (env or {}).values()]
    return {
        port for port in HANDED_OUT if any(re.search(rf"(?<!\d){port}(?!\d)", t) for t in texts)
    }


def with_new_ports(ports, cmd, env):
    """cmd and env with every port in `ports` replaced by a fresh free_port()."""
    new = {str(port): str(free_port()) for port in ports}
    pattern = re.compile(r"(?<!\d)(" + "|".join(new) + r")(?!\d)")

    def swap(text):
        return pattern.sub(lambda m: new[m.group(1)], str(text))

    return [swap(c) for c in cmd], {k: swap(v) for k, v in env.items()}


def port_clash(done) -> bool:
    return bool(PORT_CLASH.search((done.stdout or "") + (done.stderr or "")))


def cpu_env(**extra) -> dict:
    """Environment for a worker: CPU only, one thread per process (this machine has 2 cores)."""
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a worker that dies of a signal prints every thread's Python stack first.
    # MASTER_PORT: where mp.spawn's rank 0 listens (steps 02, 04 without torchrun, ddp_errors.py);
    # torchrun --standalone ignores it and binds a port of its own.
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONFAULTHANDLER="1",
        MASTER_PORT=str(free_port()),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---- The Gloo exit abort, held off -------------------------------------------------------------
# A Gloo worker thread still running when Python exits can abort a finished run ("terminate called
# without an active exception", SIGABRT), now and then (tools/exit_abort/FINDINGS.md). The steps
# and minGPT-ddp end it at its cause: destroy_process_group() joins Gloo's threads because nothing
# else holds the group. No test tolerates the abort. Chosen runs (one per step, two of minGPT-ddp:
# DDP nodes, FSDP crashed and restarted) go further with exit_checked_env(): a Gloo thread
# still alive after destroy_process_group() or at exit fails the run every time (exit 86, one
# line), not one run in thirty.
STARVE = REPO / "tools" / "exit_abort" / "starve"


def exit_checked_env(**extra) -> dict:
    """cpu_env() with tools/exit_abort/starve loaded in every process in its strict mode: each
    process that leaves a Gloo worker thread running into Python's exit fails with exit code 86
    (Linux; elsewhere the hook does nothing)."""
    path = os.pathsep.join(filter(None, [str(STARVE), os.environ.get("PYTHONPATH")]))
    return cpu_env(PYTHONPATH=path, EXIT_ABORT_STRICT="1", **extra)


def pytest_sessionstart(session):
    SESSION_START.extend([time.perf_counter(), cpu_seconds(), own_seconds()])


def cpu_seconds(who=("RUSAGE_SELF", "RUSAGE_CHILDREN")) -> float:
    """CPU time of this process and of every process it has waited for (all the runs, the kernels);
    0 where there is no `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return sum(sum(resource.getrusage(getattr(resource, w))[:2]) for w in who)


def own_seconds() -> float:
    return cpu_seconds(who=("RUSAGE_SELF",))


SESSION_START = []
# What each pytest-xdist worker counted (see "Two workers" below), summed in the main process.
WORKERS = {"cpu": 0.0, "launches": 0, "retries": []}


def pytest_sessionfinish(session):
    """In an xdist worker: hand its counts to the main process (pytest_testnodedown)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["counts"] = json.dumps({
            "cpu": cpu_seconds() - SESSION_START[1], "launches": LAUNCHES[0],
            "retries": TOLERATED["port retries"]})


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node, error):
    counts = json.loads(getattr(node, "workeroutput", {}).get("counts", "{}"))
    WORKERS["cpu"] += counts.get("cpu", 0.0)
    WORKERS["launches"] += counts.get("launches", 0)
    WORKERS["retries"] += counts.get("retries", [])


def pytest_terminal_summary(terminalreporter):
    """The port retries, visible in every run's summary; and how many cores the session kept busy
    on average (CPU time / wall time: near the core count, running more tests at a time cannot make
    the suite faster)."""
    retries = TOLERATED["port retries"] + WORKERS["retries"]
    terminalreporter.section("tolerated")
    wall = time.perf_counter() - SESSION_START[0]
    # the workers' own count, or this process's children's where the workers have ended by now
    cpu = max(cpu_seconds() - SESSION_START[1], own_seconds() - SESSION_START[2] + WORKERS["cpu"])
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "- (Windows)"
    terminalreporter.write_line(
        f"CPU time {cpu:.0f} s in {wall:.0f} s: {cpu / wall:.2f} of "
        f"{os.cpu_count()} cores busy on average (load average at the end: {load})"
    )
    terminalreporter.write_line(
        f"Launches repeated after a port clash: {len(retries)} (of "
        f"{LAUNCHES[0] + WORKERS['launches']} commands started through conftest)"
    )
    for line in retries:
        terminalreporter.write_line(f"  {line}")


# ---- Two workers ---------------------------------------------------------------------------------
# pytest.ini runs the suite in pytest-xdist workers (-n auto: one per core, at most 4): most tests
# wait on their processes part of the time (starting, a rendezvous, a timeout they provoke), and
# one test at a time kept this 2-core machine 1.45 cores busy. The tests that share a fixture of
# module or session scope run in the same worker, so that it runs once: a group per test module,
# except the notebooks, each of which is a group of its own, and notebook 07, which test_ddp_errors
# reads (conftest's executed_notebook). The largest groups start first: the last to end decides.
MAX_WORKERS = 4
LARGEST_FIRST = ["test_machines.py:tour", "07", "test_machines.py:gpu-check",
                 "test_notebooks.py::test_notebook_runs_and_draws[04_mixed_precision]",
                 "test_06_amp.py", "test_mingpt_train.py", "test_resume_and_faults.py",
                 "test_notebooks.py::test_notebook_runs_and_draws[03_scaling]", "test_slurm.py"]


def xdist_group_of(nodeid: str) -> str:
    """The group of a test, from its id ("tests/test_x.py::test_y[z]")."""
    module = nodeid.split("::")[0].split("/")[-1]
    if module == "test_notebooks.py" and "[" in nodeid:
        return "07" if "07_ddp_errors" in nodeid else nodeid.split("/")[-1]
    if module == "test_ddp_errors.py":
        return "07"
    if module == "test_machines.py" and re.search(r"::test_the_(tour|gpu_check)_", nodeid):
        # the simulations (machines_sim.py): the tour's runs for one machine serve the others
        return module + (":tour" if "::test_the_tour_" in nodeid else ":gpu-check")
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return min(os.cpu_count() or 1, MAX_WORKERS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_group_of(nodeid)

        def _assign_work_unit(self, node):
            for group in LARGEST_FIRST:  # the first of these still waiting goes first
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
                    break
            super()._assign_work_unit(node)

    return Groups(config, log)


# ---- Running commands ----------------------------------------------------------------------------
LAUNCHES = [0]


def _launch(cmd, cwd, env, timeout, merge_output):
    LAUNCHES[0] += 1
    return proc_tools.run(cmd, cwd=cwd, env=env, timeout=timeout, merge_output=merge_output)


def output_of(done) -> str:
    out, err = (done.stdout or "")[-4000:], (done.stderr or "")[-4000:]
    return f"--- stdout ---\n{out}\n--- stderr ---\n{err}"


def run(
    cmd, cwd, timeout=180, env=None, check=True, merge_output=False
) -> subprocess.CompletedProcess:
    """Run a command, capture its output; on an unexpected exit code fail with the output shown.

    Past `timeout` seconds the command, its session and every descendant are killed and the test
    fails (whatever `check`). A launch that fails on a port clash, on a port free_port() chose, runs
    once more on new ports. merge_output: stderr into stdout, in print order (stderr is then None).
    """
    cmd, env = [str(c) for c in cmd], env or cpu_env()
    done = _launch(cmd, cwd, env, timeout, merge_output)
    ours = ports_in(cmd, env)
    if done.returncode != 0 and not done.timed_out and port_clash(done) and ours:
        note("port retries", f"ports {sorted(ours)} taken: {' '.join(cmd)}")
        cmd, env = with_new_ports(ours, cmd, env)
        done = _launch(cmd, cwd, env, timeout, merge_output)
    if done.timed_out:
        raise AssertionError(
            f"command still running after {timeout} s, killed with its whole session: "
            f"{' '.join(cmd)}\n{output_of(done)}"
        )
    if check and done.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {done.returncode}: {' '.join(cmd)}\n{output_of(done)}"
        )
    return done


def torchrun(nproc, script, *args, standalone=True, extra=()):
    """The command line `torchrun --standalone --nproc-per-node N SCRIPT ARGS` (free rendezvous
    port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if standalone:
        cmd.append("--standalone")
    cmd += [*extra, "--nproc-per-node", str(nproc), str(REPO / script), *args]
    return cmd


def start_nodes(folders, args, extra=(), timeout=180, env=None) -> list:
    """Torchrun "nodes" on this machine, one process each, meeting through c10d rendezvous on
    127.0.0.1; node i works in folders[i] (its own disk). Returns each node's CompletedProcess once
    all have ended. A hang fails the test, with every node's session and workers killed; a clash on
    the rendezvous port starts all nodes once more on another port. env: cpu_env() by default."""
    results = _start_nodes(folders, args, extra, timeout, free_port(), env)
    clashed = [r for r in results if r.returncode != 0 and port_clash(r)]
    if clashed:
        note("port retries", f"rendezvous port {clashed[0].port} taken: {' '.join(map(str, args))}")
        results = _start_nodes(folders, args, extra, timeout, free_port(), env)
    return results


def _start_nodes(folders, args, extra, timeout, port, env):
    procs, logs = [], []
    for node_rank, folder in enumerate(folders):
        cmd = torchrun(
            1,
            *args,
            standalone=False,
            extra=[
                "--nnodes",
                len(folders),
                "--node-rank",
                node_rank,
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                f"test-{port}",
                "--local-addr",
                "127.0.0.1",
                *extra,
            ],
        )
        # Files, not pipes: nothing blocks on a full pipe while the others are polled. Appending:
        # reading them (which moves the offset the child shares) cannot make the child overwrite
        # what it wrote.
        out, err = tempfile.TemporaryFile("a+"), tempfile.TemporaryFile("a+")
        logs.append((out, err))
        LAUNCHES[0] += 1
        procs.append(
            subprocess.Popen(
                [str(c) for c in cmd],
                cwd=folder,
                env=env or cpu_env(),
                stdout=out,
                stderr=err,
                text=True,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                break
            # The rendezvous host could not listen: the others would wait for it until their own
            # timeout.
            if any(
                p.poll() not in (None, 0) and PORT_CLASH.search(read(e))
                for p, (_, e) in zip(procs, logs)
            ):
                break
            time.sleep(0.2)
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            proc_tools.end_session(p)
        for p in procs:
            p.wait()
    results = []
    for p, (out, err) in zip(procs, logs):
        done = subprocess.CompletedProcess(p.args, p.returncode, read(out), read(err))
        done.port = port
        results.append(done)
        out.close()
        err.close()
    if hung and not any(port_clash(r) for r in results):
        raise AssertionError(
            f"{len(hung)} of {len(procs)} nodes still running after {timeout} s, killed:\n"
            + "\n".join(f"node {i}:\n{output_of(r)}" for i, r in enumerate(results))
        )
    return results


def read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def load_script(filename: str):
    """Import a numbered step script (its name starts with a digit, so `import` can't) as a module.
    """
    path = REPO / filename
    if str(REPO) not in sys.path:  # the steps import plumbing.py from beside them
        sys.path.insert(0, str(REPO))
    name = "step_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# minGPT-ddp's modules have plain names (model, trainer, ...) that another folder's tests
# may use too: import ours fresh and put back whatever was there afterwards.
MINGPT_MODULES = tuple(sorted(path.stem for path in (REPO / "minGPT-ddp").glob("*.py")))


@pytest.fixture(scope="module")
def mingpt():
    """minGPT-ddp's model, char_dataset and config modules, imported in this process."""
    saved = {name: sys.modules.pop(name) for name in MINGPT_MODULES if name in sys.modules}
    sys.path.insert(0, str(REPO / "minGPT-ddp"))
    try:
        yield SimpleNamespace(
            **{name: importlib.import_module(name) for name in ("model", "char_dataset", "config")}
        )
    finally:
        sys.path.remove(str(REPO / "minGPT-ddp"))
        for name in MINGPT_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture
def repo() -> Path:
    return REPO


# ---- Notebooks -----------------------------------------------------------------------------------
# Each notebook runs once per session, in quick mode, and every test that reads its outputs shares
# that run: test_notebooks checks that it runs and draws, test_ddp_errors asserts on notebook 07's
# runs of ddp_errors.py.
NOTEBOOK_DIR = REPO / "notebooks"
CELL_TIMEOUT = 300  # s; the slowest cell starts a few torchrun runs
# First cell of the executed copy: record the smallest text size in every figure the notebook shows
# (the inline backend draws each through print_figure), so that the test can check it. Last cell:
# print them.
FONT_PROBE = """\
import matplotlib.backend_bases, matplotlib.text
_TEST_FONT_SIZES, _print_figure = [], matplotlib.backend_bases.FigureCanvasBase.print_figure
def _measure_then_print(canvas, *args, **kwargs):
    texts = [t for t in canvas.figure.findobj(matplotlib.text.Text)
             if t.get_visible() and t.get_text().strip()]
    _TEST_FONT_SIZES.append(min((t.get_fontsize() for t in texts), default=None))
    return _print_figure(canvas, *args, **kwargs)
matplotlib.backend_bases.FigureCanvasBase.print_figure = _measure_then_print
"""
FONT_REPORT = "import json; print('smallest text per figure (pt):', json.dumps(_TEST_FONT_SIZES))"


@pytest.fixture(scope="session")
def executed_notebook(tmp_path_factory):
    """name -> SimpleNamespace(nb, seconds, font_sizes, left_behind): runs notebooks/NAME once per
    session.

    A copy runs in a temporary directory (the committed file, with its outputs, is never rewritten)
    with NB_QUICK=1, on a kernel that runs this very interpreter, CPU only. A failing cell fails
    every test that asks for the notebook, with the cell and its traceback."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from execute_notebooks import (
        write_kernel_spec,
    )  # tools/: the kernel spec that tools/ runs notebooks with

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels, "ddp-steps-test")
    # The kernel's environment: where the repository is (the copy lives elsewhere), quick mode, no
    # GPU, no MPLBACKEND (a CI's "Agg" would stop the kernel from drawing figures inline, as Jupyter
    # does), and no __pycache__ written into notebooks/.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(
        DDP_STEPS_REPO=str(REPO), NB_QUICK="1", CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1"
    )
    done = {}

    def execute(name):  # a notebook of notebooks/, or the path of another (the checks' own test)
        if name not in done:
            folder = tmp_path_factory.mktemp(Path(name).stem)
            copy = folder / Path(name).name
            nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
            for cell in nb.cells:  # start from nothing: the committed outputs must not count
                if cell.cell_type == "code":
                    cell.outputs = []
            nb.cells = [
                nbformat.v4.new_code_cell(FONT_PROBE),
                *nb.cells,
                nbformat.v4.new_code_cell(FONT_REPORT),
            ]
            before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
            km = KernelManager(
                kernel_name="ddp-steps-test",
                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
            )
            client = nbclient.NotebookClient(
                nb,
                km=km,
                kernel_name="ddp-steps-test",
                timeout=CELL_TIMEOUT,
                resources={"metadata": {"path": str(folder)}},
            )
            start = time.perf_counter()
            try:
                client.execute(
                    cleanup_kc=True, env=env
                )  # cleanup_kc: shut the kernel down afterwards
                error = None
            except Exception as e:  # CellExecutionError: the cell and its traceback
                error = f"{name} failed:\n{e}"
            finally:
                nbformat.write(nb, copy)  # what ran, for a look after a failure (pytest keeps it)
            seconds = time.perf_counter() - start
            nb.cells = nb.cells[1:]  # the probe
            report = nb.cells.pop()
            sizes = (
                json.loads(stream_text(report).split(":", 1)[1]) if report.get("outputs") else []
            )
            # (a new notebook is not the run's doing: someone saved one meanwhile, in a shared
            # checkout)
            left = sorted(
                set(p.name for p in NOTEBOOK_DIR.iterdir() if p.suffix != ".ipynb") - set(before)
            )
            done[name] = SimpleNamespace(
                nb=nb, seconds=seconds, font_sizes=sizes, left_behind=left, error=error
            )
        if done[name].error:
            pytest.fail(done[name].error, pytrace=False)
        return done[name]

    return execute


def stream_text(cell) -> str:
    """What a code cell printed (stdout and stderr streams), as one text."""
    return "".join(
        o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
    )
