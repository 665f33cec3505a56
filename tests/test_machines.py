"""The tour and gpu-check on the machines a workshop meets, proven on this CPU (tools/plan.py,
minGPT-ddp/machine.py, docs/MACHINES.md).

* Every command that the tour and gpu-check plan for a laptop, a Mac, one T4, one A100, 2 T4s
  and 8 H100s runs here as planned (arguments, folder, processes per node), with CUDA hidden and a
  tiny GPT; each must end well and print what the plan expects (the session fixture `simulated`,
  tests/machines_sim.py).
* What a CPU cannot show (which device, precision and config a T4 would pick) is checked in this
  process with the machine faked (torch's device queries patched), against what each machine must
  run (EXPECTED), with the steps' and minGPT-ddp's own rules: the plan never asks a step for what
  it refuses there.
* gpu_check.py and tour.py themselves: the one-line refusals, a row past its time limit, the table.
* minGPT-ddp's nodes agree on a backend before they wait for each other (two torchrun nodes).
"""
import importlib.util
import os
import re
import shlex
import sys

import pytest
import torch

from conftest import REPO, TINY_GPT, load_script, start_nodes
from machines_sim import simulated  # noqa: F401  (the session fixture)

sys.path.insert(0, str(REPO / "tools"))
import plan  # noqa: E402
from plan import machine  # noqa: E402


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tour, gpu_check = load_tool("tour"), load_tool("gpu_check")

# What each example machine must run, written out by hand: processes per step, the device and
# backend of the multi-process steps, step 06 (processes, precision), minGPT-ddp's config in the
# tour, and the dtype of gpu-check's benchmark (dtype auto on its GPUs; None: no gpu-check).
EXPECTED = {
    "cpu": (2, "cpu", "gloo", (2, "bf16"), "cpu_cfg.yaml", None),
    "mps": (2, "cpu", "gloo", (2, "bf16"), "cpu_cfg.yaml", None),  # MPS: no backend between ranks
    "t4": (2, "cpu", "gloo", (1, "fp16"), "cpu_cfg.yaml", torch.float16),  # 1 GPU, 2 processes: CPU
    "a100": (2, "cpu", "gloo", (1, "bf16"), "cpu_cfg.yaml", torch.bfloat16),
    "2xt4": (2, "cuda", "nccl", (2, "fp16"), "gpt2_train_cfg.yaml", torch.float16),  # bf16 emulated
    "8xh100": (8, "cuda", "nccl", (8, "bf16"), "gpt2_train_cfg.yaml", torch.bfloat16),
}
WITH_GPU_CHECK = [name for name, expected in EXPECTED.items() if expected[-1] is not None]


def test_every_example_machine_is_expected():
    assert list(EXPECTED) == list(machine.EXAMPLES)


# ---- Every planned command, run on this CPU ------------------------------------------------------
# 8xh100's plans start 8 processes a dozen times: 665 CPU-seconds here, more than the rest of this
# file together, so they run only with DDP_STEPS_SIMULATE=all, which CI (.ci/run) sets; a plain
# `make test` skips them visibly (their arguments are checked in this process below, as every
# machine's are).
COSTLY = {"8xh100": "its 12 launches of 8 processes take ~665 CPU-s on this 2-core machine "
                    "(CI runs them)"}


def simulate(name: str):
    if name in COSTLY and os.environ.get("DDP_STEPS_SIMULATE") != "all":
        pytest.skip(f"{name}: {COSTLY[name]}; DDP_STEPS_SIMULATE=all runs them")


def failures(runs) -> str:
    return "\n\n".join(f"[{r.step.key}] {r.step.title}: {plan.judge(r)}\n"
                       f"$ {shlex.join(r.step.argv)}\n{r.output[-3000:]}"
                       for r in runs if not plan.judge(r).startswith("ok"))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_tour_planned_for_the_machine_runs_here(simulated, name):
    simulate(name)
    runs = simulated.runs(name, "tour")
    assert [r.step.key for r in runs] == ["01", "02", "03", "04", "05", "06", "mingpt", "mingpt"]
    assert not failures(runs), failures(runs)


@pytest.mark.parametrize("name", WITH_GPU_CHECK)
def test_the_gpu_check_planned_for_the_machine_runs_here(simulated, name):
    simulate(name)
    runs = simulated.runs(name, "gpu-check")
    assert [r.step.key for r in runs] == ["06", "fsdp", "resume", "bench"]
    assert not failures(runs), failures(runs)


def test_the_tour_shows_output_in_the_order_it_was_printed(simulated):
    """Step 03's crash (a traceback on stderr) comes before the restarted ranks resume (stdout)."""
    (crash,) = [r for r in simulated.runs("cpu", "tour") if r.step.key == "03"]
    assert crash.output.index("simulated crash of rank 1") < crash.output.index(
        "Resuming from snapshot.pt at Epoch 4")


def test_the_gpu_check_resume_row_tells_different_snapshots_apart(simulated, tmp_path):
    (resume,) = [r for r in simulated.runs("t4", "gpu-check") if r.step.key == "resume"]
    reference = resume.folder / "fsdp.pt"
    assert plan.same_state(reference, resume.folder / "resumed.pt")
    state = torch.load(reference, weights_only=True)
    weight = next(iter(state["model"].values()))
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))  # 1 ulp
    torch.save(state, tmp_path / "changed.pt")
    assert not plan.same_state(reference, tmp_path / "changed.pt")


# ---- The plans themselves ------------------------------------------------------------------------
def all_plans(on_cpu=False):
    return {(name, what): plan.plan(m, what, on_cpu=on_cpu) for name, m in machine.EXAMPLES.items()
            for what in ("tour", "gpu-check")}


def test_the_simulation_changes_only_the_model_size():
    minGPT_training = ("minGPT-ddp/main.py", "tools/mingpt_faults.py",
                       "minGPT-ddp/bench.py")
    for key, steps in all_plans(on_cpu=True).items():
        planned = all_plans()[key]
        assert [(s.key, s.folder, s.processes, s.timeout_s) for s in steps] == [
            (s.key, s.folder, s.processes, s.timeout_s) for s in planned], key
        for simulated_step, step in zip(steps, planned):
            extra = plan.SIM_MODEL if any(a in minGPT_training for a in step.argv) else ()
            assert simulated_step.argv == step.argv + extra, key


def processes_in(argv) -> int:
    for flag in ("--nproc-per-node", "--world_size", "--nproc"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    return 1


def test_every_command_starts_the_processes_it_plans_and_names_files_that_exist():
    for key, steps in all_plans().items():
        for step in steps:
            assert processes_in(step.argv) == step.processes, (key, step.argv)
            command = plan.resolve(step.argv)
            assert command[0] == sys.executable
            for arg in command:
                path = arg.partition("=")[2] if arg.startswith("config=") else arg
                if path.endswith((".py", ".yaml")):
                    assert os.path.isabs(path) and os.path.exists(path), (key, arg)


def test_resolve_makes_repository_paths_absolute_also_as_values():
    """Each step runs in a folder of its own: config=minGPT-ddp/... must not stay relative
    (gpu-check's bench row failed with 'config file not found' on every machine)."""
    assert plan.resolve(("python", "minGPT-ddp/bench.py", "config=minGPT-ddp/gpt2_train_cfg.yaml",
                         "--snapshot", "snapshot.pt", "trainer.log_file=mingpt.jsonl")) == [
        sys.executable, str(REPO / "minGPT-ddp/bench.py"),
        f"config={REPO / 'minGPT-ddp/gpt2_train_cfg.yaml'}", "--snapshot", "snapshot.pt",
        "trainer.log_file=mingpt.jsonl"]
    assert plan.resolve(("torchrun", "--standalone", "03_multigpu_torchrun.py"))[:4] == [
        sys.executable, "-m", "torch.distributed.run", "--standalone"]


def test_docs_show_the_plans_table():
    assert plan.machines_table() in (REPO / "docs" / "MACHINES.md").read_text()


# ---- What a CPU cannot show: the rules, with the machine faked in this process -------------------
@pytest.fixture
def fake(monkeypatch):
    """Make torch describe machine m (its device queries patched): Machine.here() then returns m,
    and every step and minGPT-ddp decide as they would there."""
    def as_machine(m: machine.Machine):
        cuda = m.accelerator == "cuda"
        accelerator = torch.device(m.accelerator) if m.accelerator else None
        monkeypatch.setattr(torch.accelerator, "current_accelerator",
                            lambda check_available=False: accelerator)
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: m.gpus)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: m.gpus if cuda else 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: m.gpu_name)
        # A T4 "supports" bf16 by emulation; including_emulation=False asks for the native kind.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                            cuda and (m.gpu_bf16 or including_emulation))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: m.cpu_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(m.cores)), raising=False)
        assert machine.Machine.here() == m
    return as_machine


def numbered_step(argv):
    """(script, its arguments) of the numbered step a command runs, or None."""
    scripts = [i for i, arg in enumerate(argv) if re.fullmatch(r"0\d_\w+\.py", arg)]
    return (argv[scripts[0]], list(argv[scripts[0] + 1:])) if scripts else None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_step_picks_there_what_the_plan_expects(fake, monkeypatch, name):
    """The steps' own device and precision rules, on the faked machine, for the tour's arguments.
    A bf16 run planned for a T4 (emulated bf16) would raise here: step 06 refuses it."""
    m = machine.EXAMPLES[name]
    processes, device, backend, (processes06, dtype06), _, _ = EXPECTED[name]
    fake(m)
    for step in plan.plan(m, "tour"):
        found = numbered_step(step.argv)
        if found is None or found[0] == "04_collectives_intro.py":  # 04: see test_04_collectives
            continue
        script, args = found
        module = load_script(script)
        if step.argv[0] == "torchrun":  # what torchrun tells its process 0
            for variable, value in dict(RANK=0, LOCAL_RANK=0, GROUP_RANK=0,
                                        WORLD_SIZE=step.processes,
                                        LOCAL_WORLD_SIZE=step.processes).items():
                monkeypatch.setenv(variable, str(value))
        parsed = module.parse_args(args)
        if script == "01_single_gpu.py":
            assert module.pick_device().type == (m.accelerator or "cpu")
            continue
        picked, picked_backend = module.pick_device(0, step.processes)
        if script == "06_amp.py":
            assert step.processes == processes06
            expected = ("cuda", "nccl") if machine.uses_gpus(m, processes06) else ("cpu", "gloo")
            assert (picked.type, picked_backend) == expected
            assert module.pick_dtype(parsed.dtype, picked) == dtype06
        else:
            assert step.processes == processes
            assert (picked.type, picked_backend) == (device, backend), script


@pytest.mark.parametrize("name", list(EXPECTED))
def test_mingpt_picks_there_what_the_plan_expects(fake, mingpt, monkeypatch, name):
    """minGPT-ddp's default config, device and dtype auto on the faked machine. The 25M-parameter
    GPT only where the processes get GPUs: 2 CPU processes of a one-GPU notebook or a Mac train the
    small one."""
    import ddp_setup
    import trainer
    m = machine.EXAMPLES[name]
    processes, device, backend, _, config, bench_dtype = EXPECTED[name]
    fake(m)
    (train, _) = [s for s in plan.plan(m, "tour") if s.key == "mingpt"]
    assert train.processes == processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert mingpt.config.default_config_path().name == config
    picked, picked_backend = ddp_setup.pick_device(0, processes)
    assert (picked.type, picked_backend) == (device, backend)
    checks = plan.plan(m, "gpu-check")
    if bench_dtype is None:
        assert checks == []
        return
    (bench,) = [s for s in checks if s.key == "bench"]
    picked, picked_backend = ddp_setup.pick_device(0, bench.processes)
    assert (picked.type, picked_backend, bench.processes) == ("cuda", "nccl", m.gpus)
    assert trainer.resolve_dtype("auto", picked) == bench_dtype
    assert ("dtype", str(bench_dtype).removeprefix("torch.")) in bench.record


def config_arguments(argv, default: str) -> list:
    """The KEY=VALUE arguments of a minGPT-ddp command (config= made absolute, else the default)."""
    arguments = [arg for arg in plan.resolve(argv)[1:] if "=" in arg and not arg.startswith("-")]
    given = any(arg.startswith("config=") for arg in arguments)
    return arguments if given else [f"config={REPO / 'minGPT-ddp' / default}", *arguments]


# Machines with a number of GPUs that the example machines do not have (3, 6, 12): the plans must
# still share the work out evenly.
ODD = {f"{n}xa100": machine.Machine("cuda", n, "NVIDIA A100-SXM4-80GB", gpu_bf16=True, cores=64)
       for n in (3, 6, 12)}


@pytest.mark.parametrize("name", list(EXPECTED) + list(ODD))
def test_every_planned_argument_is_in_range_for_its_world_size(mingpt, monkeypatch, name):
    """In this process, for every machine (8 H100s too): each minGPT-ddp command's config and
    minGPT-ddp's own checks for that world size and device (a global batch the ranks share evenly,
    FSDP's validation batches per rank, compile), and step 06's inf injected at a step that an
    epoch has on that many GPUs (step 40 never came on 8 GPUs: 15 steps per epoch)."""
    import ddp_setup
    import trainer
    from torch.utils.data import DataLoader, DistributedSampler
    m = machine.EXAMPLES.get(name) or ODD[name]
    checked = 0
    for step in plan.plan(m, "tour") + plan.plan(m, "gpu-check"):
        n, argv = step.processes, step.argv
        device = torch.device(machine.device_type(m, n), 0 if machine.uses_gpus(m, n) else None)
        if any(arg.startswith("minGPT-ddp/") or "mingpt_faults" in arg for arg in argv) and \
                "sample.py" not in " ".join(argv):
            cfg, _, _ = mingpt.config.load(config_arguments(argv, machine.mingpt_config(m, n)))
            grouped = argv[0] == "torchrun" or n > 1  # bench.py --nproc 1: one plain process
            rt = ddp_setup.Runtime(0, 0, n, device, machine.backend(m, n) if grouped else None)
            trainer.check_setup(cfg.trainer, rt)
            checked += 1
        if "--inf-at-step" in argv:
            for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
                monkeypatch.setenv(variable, str(n if "WORLD" in variable else 0))
            step06 = load_script("06_amp.py")
            args = step06.parse_args(list(argv[argv.index("06_amp.py") + 1:]))
            train_set = step06.load_train_objs(args)[0]
            share = DistributedSampler(train_set, num_replicas=n, rank=0)
            per_epoch = len(DataLoader(train_set, batch_size=args.batch_size, sampler=share))
            assert int(argv[argv.index("--inf-at-step") + 1]) < per_epoch * args.max_epochs, name
            checked += 1
    assert checked == (1 if m.accelerator != "cuda" else 5)


def test_every_bf16_question_asks_for_native_bf16():
    """torch.cuda.is_bf16_supported() says True on a T4 or V100, which only emulate bf16 (slower
    than fp32, and refused by step 06): every script and notebook must ask
    including_emulation=False (notebook 04 did not, and ran bf16 on 2 T4s; it now asks
    machine.py)."""
    files = [*REPO.glob("0*_*.py"), *REPO.glob("minGPT-ddp/*.py"), *REPO.glob("tools/*.py"),
             *REPO.glob("notebooks/*.py"), *REPO.glob("notebooks/*.ipynb")]
    calls = [(path.name, call) for path in files
             for call in re.findall(r"is_bf16_supported\(([^)]*)\)", path.read_text())]
    assert len(calls) >= 2  # machine.py and step 06 (notebook 04 asks machine.py)
    assert [(name, call) for name, call in calls if call != "including_emulation=False"] == []


# ---- gpu_check.py and tour.py --------------------------------------------------------------------
def test_gpu_check_without_a_gpu_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    assert str(stop.value) == ("error: gpu-check needs an NVIDIA GPU, and PyTorch sees none here "
                               "(torch.cuda.is_available() is False)")


@pytest.mark.parametrize("args, expected", [
    (["--on-cpu"], "error: --on-cpu plans for this machine's NVIDIA GPUs, and it has none: add "
                   "--machine NAME (cpu, mps, t4, a100, 2xt4, 8xh100)"),
    (["--on-cpu", "--machine", "mps"],
     "error: mps has no NVIDIA GPU: gpu-check plans nothing for it"),
])
def test_gpu_check_on_cpu_needs_a_machine_with_gpus(monkeypatch, args, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine.Machine, "here", classmethod(lambda cls: machine.EXAMPLES["cpu"]))
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(args)
    assert str(stop.value) == expected


@pytest.mark.parametrize("args, expected", [
    (["--machine", "t4"],
     "error: --machine plans for another machine, whose GPUs are not here: add --on-cpu"),
    (["--on-cpu", "--machine", "v100"], "error: argument --machine: invalid choice: 'v100'"),
])
def test_gpu_check_bad_flags_are_one_line(capsys, args, expected):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(args)
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_row_past_its_time_limit_is_ended_with_its_processes_and_the_table_still_printed(
        monkeypatch, tmp_path, capsys):
    """gpu-check's rows each get a time limit (tools/proc.py): a hung row is ended with every
    process it started, even one in a session of its own (as torchrun's workers are), and the next
    rows still run."""
    hang = ("import subprocess, sys, time; "
            "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            "start_new_session=True); open('worker.pid', 'w').write(str(worker.pid)); "
            "time.sleep(120)")
    steps = [plan.Step("hang", "a row that hangs", ("python", "-c", hang), "hang", 1, timeout_s=3),
             plan.Step("quick", "a row after it", ("python", "-c", "print('all well')"), "quick", 1,
                       ("all well",))]
    monkeypatch.setattr(gpu_check.plan, "plan", lambda *args, **kwargs: steps)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--on-cpu", "--machine", "t4", "--workdir", str(tmp_path)])
    assert stop.value.code == 1
    table = capsys.readouterr().out.split("| check |", 1)[1]
    assert re.search(r"\| hang \| a row that hangs \| TIMEOUT \(3 s\) \| [\d.]+ \|", table)
    assert re.search(r"\| quick \| a row after it \| ok \|", table)
    assert not alive(int((tmp_path / "hang" / "worker.pid").read_text()))


def test_the_tour_says_in_one_line_that_pytorch_is_too_old(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    monkeypatch.setattr(machine.Machine, "here",
                        classmethod(lambda cls: pytest.fail("went on past the check")))
    with pytest.raises(SystemExit) as stop:
        tour.main(["--workdir", str(tmp_path)])
    assert str(stop.value) == ("error: ddp-steps needs PyTorch 2.7 or newer (torch.accelerator), "
                               "this is 2.6.0+cu124: make install, or pip install -U torch")
    plan.require_torch("2.7.0")  # the oldest it takes


# ---- Several nodes agree on the backend ----------------------------------------------------------
def test_nodes_that_pick_different_backends_stop_in_one_line(tmp_path):
    """A node with fewer GPUs than processes picks Gloo, its peers NCCL: without an agreement they
    would wait for each other until the timeout. Node 1 is made to pick another backend from
    outside (tests/workers/mingpt_backend.py); both nodes stop at once, each saying what every node
    picked."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    results = start_nodes(folders, ["tests/workers/mingpt_backend.py", "--on-node", "1", "--pick",
                                    "nccl", "config=" + str(REPO / "minGPT-ddp" / "cpu_cfg.yaml"),
                                    *TINY_GPT, "trainer.timeout_minutes=2"], timeout=100)
    line = ("error: the nodes picked different backends and would wait for each other until the "
            "timeout: node 0 (rank 0): gloo on cpu, 0 GPU(s) for 1 process(es); node 1 (rank 1): "
            "nccl on cpu, 0 GPU(s) for 1 process(es). Give every node one GPU per process "
            "(torchrun --nproc-per-node), or hide the GPUs on every node "
            "(CUDA_VISIBLE_DEVICES=) to train on CPUs")
    for node in results:
        assert node.returncode != 0
        assert line in node.stderr.splitlines(), node.stderr[-3000:]
        worker = node.stderr.split("failed (exitcode")[0]  # before torchrun's report of the failure
        assert "Traceback" not in worker, node.stderr[-3000:]
