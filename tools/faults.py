"""Run a step with a fault injected from outside, for the tour and the tests: the lessons carry no
demo hooks. It loads the step, patches it, then runs the step's own launch:

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tools/faults.py --crash-at-epoch 3 \\
        03_multigpu_torchrun.py --max_epochs 6
    torchrun --standalone --nproc-per-node 2 tools/faults.py --inf-at-step 70 06_amp.py --dtype fp16
    python tools/faults.py --dump-ranks out 02_multigpu_mp_spawn.py --max_epochs 4

Faults (any of them, or none):
--crash-at-epoch E   one rank (--rank, default the last) raises at the start of epoch E, on
                     torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0), so that a
                     restart can resume. On several nodes torchrun counts restarts per node: add
                     --once-file F on a disk all nodes share; the crashing rank creates F, and no
                     rank crashes where it exists
--inf-at-step S      at optimizer step S of the first attempt (counted from 0), one rank's scaled
                     loss becomes inf, so its gradients overflow (step 06); rank 0 prints what
                     GradScaler did about it
--other-backend B    the processes of the node torchrun numbered 1 (GROUP_RANK) pick backend B,
                     the device unchanged: as a node with fewer GPUs than processes picks Gloo
                     where the others pick NCCL
Observations, for the tests:
--dump-ranks DIR     after training, every rank saves its model and optimizer state (and
                     GradScaler's) to DIR/rank<R>.pt, so that all copies can be compared
--keep-snapshots     after each snapshot is written, a copy: <snapshot>.epochs<N>

Steps 02 and 04 (mp.spawn) run without torchrun: the spawned processes load this file again
(as __mp_main__), and so get the same patches.
"""
import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser(description="Run a step with a fault injected from outside "
                                     "(tour and tests).",
                                     usage="[torchrun ...] tools/faults.py FAULTS STEP.py [ARGS]")
    parser.add_argument("--crash-at-epoch", type=int, metavar="E", help="a rank raises at epoch E")
    parser.add_argument("--inf-at-step", type=int, metavar="S", help="a rank's loss is inf at S")
    parser.add_argument("--other-backend", metavar="B", help="node 1's processes pick backend B")
    parser.add_argument("--rank", type=int, default=None, help="which rank fails (default: last)")
    parser.add_argument("--once-file", default=None, metavar="F",
                        help="--crash-at-epoch: only if F does not exist, and create it")
    parser.add_argument("--dump-ranks", default=None, metavar="DIR",
                        help="every rank's final state to DIR/rank<R>.pt")
    parser.add_argument("--keep-snapshots", action="store_true",
                        help="keep a copy of every snapshot")
    parser.add_argument("script", help="the step, e.g. 03_multigpu_torchrun.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the step's own arguments")
    return parser.parse_args(argv)


def load_step(script: str):
    path = Path(script) if Path(script).is_file() else REPO / script
    if not path.is_file():
        raise SystemExit(f"error: no step script {script}")
    sys.path.insert(0, str(path.resolve().parent))  # as python does for a script: plumbing.py
    spec = importlib.util.spec_from_file_location("step_under_test", path)
    step = importlib.util.module_from_spec(spec)
    sys.modules["step_under_test"] = step  # mp.spawn's processes find step.main by this name
    spec.loader.exec_module(step)  # its `if __name__ == "__main__"` part does not run
    return step


def first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def faulty_rank(chosen):
    return dist.get_world_size() - 1 if chosen is None else chosen


def crash_at_epoch(step, crash_epoch: int, chosen_rank, once_file=None):
    run_epoch = step.Trainer._run_epoch

    def _run_epoch(self, epoch):
        crash = first_attempt() and not (once_file and os.path.exists(once_file))
        if epoch == crash_epoch and self.rank == faulty_rank(chosen_rank) and crash:
            if once_file is not None:
                Path(once_file).touch()
            raise RuntimeError(f"simulated crash of rank {self.rank} at epoch {epoch} "
                               "(tools/faults.py)")
        return run_epoch(self, epoch)

    step.Trainer._run_epoch = _run_epoch


def inf_at_step(step, inf_step: int, chosen_rank):
    run_batch = step.Trainer._run_batch

    def _run_batch(self, source, targets):
        self.steps_run = getattr(self, "steps_run", 0)
        if self.steps_run != inf_step or not first_attempt():
            self.steps_run += 1
            return run_batch(self, source, targets)
        weights = [p.detach().clone() for p in self.model.parameters()]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == faulty_rank(chosen_rank):
            real_scale = self.scaler.scale
            self.scaler.scale = lambda loss: real_scale(loss) * float("inf")  # it overflows
        loss = run_batch(self, source, targets)
        self.scaler.__dict__.pop("scale", None)  # back to GradScaler.scale
        changed = any(not torch.equal(w, p) for w, p in zip(weights, self.model.parameters()))
        new_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == 0:
            print(f"{self.tag} Step {inf_step} | inf injected into rank "
                  f"{faulty_rank(chosen_rank)}'s loss | weights changed: {changed} | scale "
                  f"{scale} -> {new_scale}"
                  + (" | GradScaler skipped the step on this rank" if not changed else ""),
                  flush=True)
        self.steps_run += 1
        return loss

    step.Trainer._run_batch = _run_batch


def other_backend(step, backend: str):
    pick_device = step.pick_device

    def pick(*args, **kwargs):
        device, picked = pick_device(*args, **kwargs)
        return device, backend if os.environ.get("GROUP_RANK") == "1" else picked

    step.pick_device = pick


def dump_ranks(step, folder: str):
    train = step.Trainer.train

    def train_and_dump(self, max_epochs):
        train(self, max_epochs)
        state = {"model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if hasattr(self, "scaler"):
            state["scaler"] = self.scaler.state_dict()
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"rank{self.rank}.pt")

    step.Trainer.train = train_and_dump


def keep_snapshots(step):
    save_snapshot = step.Trainer._save_snapshot

    def save_and_keep(self, epoch):
        save_snapshot(self, epoch)
        shutil.copy(self.snapshot_path, f"{self.snapshot_path}.epochs{epoch + 1}")

    step.Trainer._save_snapshot = save_and_keep


def prepare(args):
    """Load the step and apply the faults: in the process torchrun or python started, and again
    in every process mp.spawn starts (step 02, 04)."""
    step = load_step(args.script)
    if args.crash_at_epoch is not None:
        crash_at_epoch(step, args.crash_at_epoch, args.rank, args.once_file)
    if args.inf_at_step is not None:
        inf_at_step(step, args.inf_at_step, args.rank)
    if args.other_backend is not None:
        other_backend(step, args.other_backend)
    if args.dump_ranks is not None:
        dump_ranks(step, args.dump_ranks)
    if args.keep_snapshots:
        keep_snapshots(step)
    return step


@record  # under torchrun: a rank's exception goes to its error file, so into torchrun's report
def main():
    args = parse(sys.argv[1:])
    step = prepare(args)
    step_args = step.parse_args(args.script_args)
    if hasattr(step, "spawn") and "LOCAL_RANK" not in os.environ:
        step.spawn(step_args)  # 02 and 04 started by plain python: they start their processes
    else:
        step.main(step_args)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":  # a process mp.spawn started: the same step, the same faults
    prepare(parse(sys.argv[1:]))
