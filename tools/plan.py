"""What the tour and gpu-check run on a machine: one plan, decided from a description of it.

    plan(machine, "tour")       every step in order, small settings (tools/tour.py, `make tour`)
    plan(machine, "gpu-check")  what the tour does not show on NVIDIA GPUs: GradScaler skipping an
                                overflow on every GPU, minGPT-ddp under FSDP in float16, killed and
                                resumed, and compiled in its best dtype: tokens/s, MFU
                                (tools/gpu_check.py)

The machine is minGPT-ddp/machine.py's Machine: Machine.here() for this one, or a description
written by hand (machine.EXAMPLES: a T4, an A100, 8 H100s, a Mac, ...). The tests compute each
example's plan and run every command of it on this CPU, with CUDA hidden (CUDA_VISIBLE_DEVICES=,
as `tools/gpu_check.py --on-cpu` does): same arguments, same folders, same numbers of processes;
only minGPT-ddp's model is shrunk (SIM_MODEL, appended), so that 8 processes fit on 2 cores.
`python tools/plan.py [NAME]` prints the plans and the table of docs/MACHINES.md.

A command is written as you would type it in the repository's root (`python`, `torchrun`,
repository paths); resolve() makes it runnable from the step's own folder.
"""
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "minGPT-ddp"))
sys.path.insert(0, str(REPO / "tools"))
import machine  # noqa: E402  (minGPT-ddp/machine.py: the machine and its rules)
import proc  # noqa: E402  (tools/proc.py: a time limit that ends a command and all its processes)

MIN_TORCH = (2, 7)  # torch.accelerator.current_accelerator(check_available=True): every script
# What the tests (and --on-cpu) append to each minGPT-ddp training command: a 30k-parameter GPT
# instead of the config's, so that 8 processes train it on 2 cores in seconds. Only sizes: the
# iterations, the evaluation batches, the process counts and every other argument stay as planned.
# And a peak for MFU instead of timing matmuls: a CPU without float16 units takes half a minute.
SIM_MODEL = ("model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
             "trainer.batch_size=4", "trainer.peak_flops=1e12")
CPU_SWITCH = {"CUDA_VISIBLE_DEVICES": ""}  # hides CUDA GPUs: every step then picks the CPU, Gloo
GPT2_CFG = "minGPT-ddp/gpt2_train_cfg.yaml"


@dataclass(frozen=True)
class Step:
    key: str  # the row: "01".."06", "mingpt" (tour); "06", "fsdp", "resume", "bench" (gpu-check)
    title: str
    argv: tuple  # as typed in the repository's root
    folder: str  # where it runs, under the run's root; a folder's steps share its files, in order
    processes: int  # processes it starts per node (what the machine's GPUs must match)
    expect: tuple = ()  # texts its output must contain, on the machine that runs it
    timeout_s: int = 300  # then it is ended with all its processes (tools/proc.py)
    log_file: Optional[str] = None  # the JSON-lines log it writes (the tour's final-loss column)
    record: tuple = ()  # (key, value) pairs that the log's last record must hold
    same_state: Optional[tuple] = None  # two snapshots in its folder that must be equal after it


def processes_per_node(m: machine.Machine) -> int:
    """One process per GPU where there are two or more; else two, which the steps put on the CPU
    (a step uses GPUs only with one for every process: machine.uses_gpus)."""
    return m.gpus_with_backend if m.gpus_with_backend >= 2 else 2


def plan(m: machine.Machine, what: str, on_cpu: bool = False) -> list:
    """The steps of `what` ("tour" or "gpu-check") for machine m. on_cpu: to run here with the
    GPUs hidden (the tests, gpu_check --on-cpu): the same commands with SIM_MODEL appended, and
    the output expected from this machine's CPU instead of m's devices."""
    runs_on = machine.Machine.here().without_gpus() if on_cpu else m
    sim = SIM_MODEL if on_cpu else ()
    if what == "tour":
        return tour(m, runs_on, sim)
    if what == "gpu-check":
        return gpu_check(m, runs_on, sim)
    raise ValueError(f"what: 'tour' or 'gpu-check', not {what!r}")


def shared_batches(n: int) -> tuple:
    """gpt2_train_cfg.yaml's micro-batches (a fixed global batch) are shared among the ranks; where
    n ranks cannot share them evenly (3, 6, 12 GPUs): their count rounded up to a multiple of n."""
    from omegaconf import OmegaConf
    micro_batches = OmegaConf.load(REPO / GPT2_CFG).trainer.grad_accum_steps
    if micro_batches % n == 0:
        return ()
    return (f"trainer.grad_accum_steps={n * -(-micro_batches // n)}",)


def torchrun(n: int, *extra) -> tuple:
    return ("torchrun", "--standalone", *extra, "--nproc-per-node", str(n))


def device_text(d: machine.Machine, n: int) -> str:
    """The header that steps 02-06 and minGPT-ddp print with n processes per node on machine d."""
    return (f"device {machine.device_type(d, n)} | backend {machine.backend(d, n)} | "
            f"world_size {n}")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def step06_dtype(d: machine.Machine, n: int, flag: Optional[str] = None):
    """What step 06 runs in (its pick_dtype): --dtype if given, else the machine's AMP dtype for
    its device (bf16 where native, else fp16 on GPUs, fp32 on CPUs)."""
    import torch
    if flag:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[flag]
    return machine.amp_dtype(d, on_gpu=machine.uses_gpus(d, n))


def tour(m: machine.Machine, d: machine.Machine, sim: tuple) -> list:
    n = processes_per_node(m)
    n06 = 1 if m.gpus_with_backend == 1 else n  # one GPU: mixed precision where it pays, on the GPU
    # GPUs: the step's default, the GPU's AMP dtype. CPUs: bf16 even where it is emulated (step 06
    # would pick fp32 there): the tour is there to show autocast.
    flag = None if machine.uses_gpus(m, n06) else "bf16"
    amp = dtype_name(step06_dtype(m, n06, flag))
    amp_there = dtype_name(step06_dtype(d, n06, flag))  # where it runs (on_cpu: this CPU)
    precision = {"bfloat16": ("precision bf16: autocast",),
                 "float16": ("precision fp16: autocast", "GradScaler on"),
                 "float32": ("precision fp32: autocast off",)}
    epochs = ("--max_epochs", "5")
    finished = "Finished training: 5 epochs"
    return [
        Step("01", "one device", ("python", "01_single_gpu.py", *epochs, "--log_file", "01.jsonl"),
             "01", 1, (f"device {d.accelerator or 'cpu'} | backend none", finished),
             log_file="01.jsonl"),
        Step("02", "DDP started by mp.spawn",
             ("python", "02_multigpu_mp_spawn.py", "--world_size", str(n), *epochs,
              "--log_file", "02.jsonl"),
             "02", n, (device_text(d, n), finished), log_file="02.jsonl"),
        # tools/faults.py makes the last rank raise as epoch 5 begins, on torchrun's first attempt
        # only: torchrun restarts every rank, and they resume from the snapshot of epoch 4.
        Step("03", "torchrun: snapshots, a crash, restart, resume",
             (*torchrun(n, "--max-restarts", "1"), "tools/faults.py", "--crash-at-epoch", "5",
              "03_multigpu_torchrun.py", "--save_every", "2", "--max_epochs", "8",
              "--log_file", "03.jsonl"),
             "03", n, (device_text(d, n), "simulated crash of rank",
                       "Resuming from snapshot.pt at Epoch 4", "Finished training: 8 epochs"),
             log_file="03.jsonl"),
        Step("04", "collectives", ("python", "04_collectives_intro.py", "--world_size", str(n)),
             "04", n, (device_text(d, n), "Done: ")),
        Step("05", "validation over ranks (fp32)",
             (*torchrun(n), "05_singlenode_cpu.py", *epochs, "--log_file", "05.jsonl"),
             "05", n, (device_text(d, n), finished), log_file="05.jsonl"),
        Step("06", f"05 + mixed precision ({amp}){' on the GPU' if n06 == 1 else ''}",
             (*torchrun(n06), "06_amp.py", *epochs, *(("--dtype", flag) if flag else ()),
              "--log_file", "06.jsonl"),
             "06", n06, (device_text(d, n06), *precision[amp_there], finished),
             log_file="06.jsonl"),
        Step("mingpt", "minGPT-ddp: train a small GPT",
             (*torchrun(n), "minGPT-ddp/main.py", "trainer.max_iters=200",
              "trainer.eval_interval=100", "trainer.snapshot_path=mingpt.pt",
              "trainer.log_file=mingpt.jsonl",
              *(shared_batches(n) if machine.mingpt_config(m, n) == "gpt2_train_cfg.yaml" else ()),
              *sim),
             "mingpt", n, (device_text(d, n), f"minGPT-ddp/{machine.mingpt_config(d, n)} |",
                           "Finished training: steps 0-200"),
             timeout_s=600, log_file="mingpt.jsonl"),
        Step("mingpt", "minGPT-ddp: sample from it",
             ("python", "minGPT-ddp/sample.py", "--snapshot", "mingpt.pt", "--prompt", "def ",
              "--max-new-tokens", "200"),
             "mingpt", 1, ("# mingpt.pt: step 200",)),
    ]


def gpu_check(m: machine.Machine, d: machine.Machine, sim: tuple) -> list:
    """Nothing for a machine without NVIDIA GPUs. What the tour shows on GPUs (every step, DDP over
    NCCL, step 06 in the GPU's AMP dtype, minGPT-ddp's 25M GPT) is not repeated. (No row for the
    CUDA-only tests: the suite has none since its GradScaler test on CUDA became the "06" row.)"""
    g = m.gpus_with_backend
    if m.accelerator != "cuda" or g == 0:
        return []
    on_gpus = machine.uses_gpus(d, g)
    # FSDP in float16 with GradScaler (every GPU has it), deterministic kernels so that a killed
    # and resumed run compare bit for bit; 4 validation batches per rank (FSDP needs equal shares).
    fsdp = ("config=" + GPT2_CFG, "trainer.strategy=fsdp", "trainer.dtype=float16",
            "trainer.deterministic=true", "trainer.max_iters=40", "trainer.eval_interval=20",
            f"trainer.eval_iters={4 * g}", "trainer.log_interval=10", *shared_batches(g))
    return [
        # At optimizer step 5 of the first epoch (15 steps on 8 GPUs, 8 on 16), the last rank's loss
        # becomes inf (tools/faults.py): every rank must skip that step and halve the scale.
        Step("06", f"step 06, fp16 on {g} GPU(s): GradScaler skips an overflow",
             (*torchrun(g), "tools/faults.py", "--inf-at-step", "5", "06_amp.py", "--dtype", "fp16",
              "--max_epochs", "1", "--log_file", "06.jsonl"),
             "06", g, (device_text(d, g), "precision fp16: autocast", "GradScaler on",
                       "inf injected into rank", "weights changed: False",
                       "GradScaler skipped the step")),
        Step("fsdp", f"minGPT-ddp, FSDP over {g} GPU(s), float16 + GradScaler",
             (*torchrun(g), "minGPT-ddp/main.py", *fsdp, "trainer.snapshot_path=fsdp.pt",
              "trainer.log_file=fsdp.jsonl", *sim),
             "mingpt", g, (device_text(d, g), "strategy fsdp", "dtype float16",
                           "Finished training: steps 0-40")),
        # The same run, whose last rank raises at step 30 (tools/mingpt_faults.py, from
        # outside the trainer); torchrun restarts every rank, and they resume from step 20.
        Step("resume", "the same, killed at step 30 and resumed: bit-identical",
             (*torchrun(g, "--max-restarts", "1"), "tools/mingpt_faults.py",
              "--crash-at-step", "30", *fsdp, "trainer.snapshot_path=resumed.pt",
              "trainer.log_file=resumed.jsonl", "trainer.resume=auto", *sim),
             "mingpt", g, ("simulated crash of rank", "resuming from resumed.pt at step 20",
                           "Finished training: steps 20-40"),
             timeout_s=400, same_state=("fsdp.pt", "resumed.pt")),
        Step("bench", "minGPT-ddp, DDP, dtype auto, compiled: tokens/s, MFU",
             ("python", "minGPT-ddp/bench.py", "--nproc", str(g), "--iters", "40", "--warmup", "10",
              "--windows", "4", "--log_file", "bench.jsonl", "config=" + GPT2_CFG,
              "trainer.compile=true", *shared_batches(g), *sim),
             "bench", g, ("tok/s",), timeout_s=600, log_file="bench.jsonl",
             record=(("device", machine.device_type(d, g)), ("world_size", g),
                     ("dtype", dtype_name(machine.amp_dtype(d, on_gpus))), ("compile", True))),
    ]


# ---- Running a step --------------------------------------------------------------------------
def is_repository_path(text: str) -> bool:
    """A script or a path in the repository: "06_amp.py", "minGPT-ddp/cpu_cfg.yaml", "tests/".
    Output names ("snapshot.pt", "01.jsonl") are not, even where such a file lies in the root."""
    return (text.endswith(".py") or "/" in text) and (REPO / text).exists()


def resolve(argv, python: str = sys.executable) -> list:
    """The command as it runs from its own folder: `python` -> this interpreter, `torchrun` ->
    this interpreter's torch.distributed.run, and each repository path -> its absolute path, also
    as the value of KEY=PATH (config=minGPT-ddp/gpt2_train_cfg.yaml)."""
    head = {"python": [python], "torchrun": [python, "-m", "torch.distributed.run"]}[argv[0]]
    out = []
    for arg in argv[1:]:
        key, equals, value = arg.partition("=")
        if is_repository_path(arg):
            arg = str(REPO / arg)
        elif equals and not key.startswith("-") and is_repository_path(value):
            arg = f"{key}={REPO / value}"
        out.append(arg)
    return head + out


@dataclass
class Run:
    step: Step
    folder: Path
    returncode: int
    output: str  # stdout and stderr together, in the order they were printed
    seconds: float
    timed_out: bool


def execute(step: Step, root: Path, env: Optional[dict] = None) -> Run:
    folder = root / step.folder
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = proc.run(resolve(step.argv), cwd=folder, env=env, timeout=step.timeout_s,
                    merge_output=True)
    return Run(step, folder, done.returncode, done.stdout or "", time.perf_counter() - start,
               done.timed_out)


def judge(run: Run) -> str:
    """ "ok", or what went wrong, in a few words."""
    step = run.step
    if run.timed_out:
        return f"TIMEOUT ({step.timeout_s} s)"
    if run.returncode != 0:
        return f"FAILED (exit {run.returncode})"
    missing = [text for text in step.expect if text not in run.output]
    if missing:
        return f"FAILED (no '{missing[0].strip()}')"
    if step.same_state and not same_state(*(run.folder / name for name in step.same_state)):
        return f"FAILED ({' and '.join(step.same_state)} differ)"
    last = last_record(run.folder / step.log_file) if step.record else {}
    wrong = [f"{key} {last.get(key)!r}, not {value!r}" for key, value in step.record
             if last.get(key) != value]
    if wrong:
        return f"FAILED ({step.log_file}: {wrong[0]})"
    return "ok"


def last_record(log: Path) -> dict:
    """The last record of a JSON-lines log, or {} where there is none."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def same_state(a: Path, b: Path) -> bool:
    """Two minGPT-ddp snapshots hold the same step, weights, AdamW state and gradient scaler, bit
    for bit."""
    import torch

    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return (isinstance(y, dict) and x.keys() == y.keys()
                    and all(equal(x[k], y[k]) for k in x))
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(equal, x, y))
        return x == y

    if not (a.is_file() and b.is_file()):
        return False
    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return all(equal(x[k], y[k]) for k in ("step", "model", "optimizer", "scaler"))


def require_torch(version: Optional[str] = None):
    """One line and exit 1 where PyTorch is older than the scripts need."""
    import torch
    version = version or torch.__version__
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TORCH:
        raise SystemExit(f"error: ddp-steps needs PyTorch {'.'.join(map(str, MIN_TORCH))} or newer "
                         f"(torch.accelerator), this is {version}: make install, or pip install -U "
                         "torch")


# ---- The table of docs/MACHINES.md -----------------------------------------------------------
def machines_table() -> str:
    """One row per example machine: where its tour runs each step, step 06's precision, minGPT-ddp's
    config and dtype, what gpu-check runs (read from plan() itself)."""
    rows = ["| machine | processes per step | on the GPU(s) | on the CPU (Gloo) | step 06 "
            "| minGPT-ddp in the tour | gpu-check |", "|---|---|---|---|---|---|---|"]
    for name, m in machine.EXAMPLES.items():
        steps = [s for s in plan(m, "tour") if "sample" not in s.title]
        on_gpu = [s.key for s in steps if
                  (m.accelerator if s.key == "01" else machine.uses_gpus(m, s.processes))]
        on_cpu = [s.key for s in steps if s.key not in on_gpu]
        (s06,) = [s for s in steps if s.key == "06"]
        flag06 = s06.argv[s06.argv.index("--dtype") + 1] if "--dtype" in s06.argv else None
        (mingpt,) = [s for s in steps if s.key == "mingpt"]
        on_gpus = machine.uses_gpus(m, mingpt.processes)
        dtype = dtype_name(machine.amp_dtype(m, on_gpu=True)) if on_gpus else "float32"  # cpu_cfg's
        checks = plan(m, "gpu-check")
        counts = sorted({s.processes for s in steps if s.key != "01"})
        rows.append(
            f"| {name}: {m.describe()} | {', '.join(map(str, counts))} | "
            f"{', '.join(on_gpu) or '-'} | {', '.join(on_cpu) or '-'} | "
            f"{dtype_name(step06_dtype(m, s06.processes, flag06))}, {s06.processes} process(es) | "
            f"{machine.mingpt_config(m, mingpt.processes)}, {dtype}, {mingpt.processes} processes"
            " | "
            + (f"{len(checks)} rows, {checks[-1].processes} process(es)" if checks else "refused")
            + " |")
    return "\n".join(rows)


def main():
    import shlex
    for name in sys.argv[1:] or list(machine.EXAMPLES):
        m = machine.EXAMPLES[name]
        print(f"## {name}: {m.describe()}")
        for what in ("tour", "gpu-check"):
            for s in plan(m, what):
                print(f"  {what:<9} [{s.key}] {s.folder}/$ {shlex.join(s.argv)}")
        print()
    print(machines_table())


if __name__ == "__main__":
    main()
