"""Inject a fault into a torchrun step from outside, for the tour and the tests: the lessons carry no demo hooks.

Start it with torchrun in place of the step; it loads the step, patches one method, then runs the step's main:

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tools/faults.py --crash-at-epoch 3 \\
        03_multigpu_torchrun.py --max_epochs 6
    torchrun --standalone --nproc-per-node 2 tools/faults.py --inf-at-step 70 06_amp.py --dtype fp16
    torchrun --standalone --nproc-per-node 1 tools/faults.py --die-while-saving 03_multigpu_torchrun.py
    torchrun --nnodes 2 ... tools/faults.py --other-backend nccl 03_multigpu_torchrun.py   # each node

--crash-at-epoch E   one rank (--rank, default the last) raises at the start of epoch E, on torchrun's first
                     attempt only (TORCHELASTIC_RESTART_COUNT 0), so that a restart can resume. On several nodes
                     torchrun counts restarts per node, so add --once-file F on a disk all nodes share: the
                     crashing rank creates F, and no rank crashes where it exists
--inf-at-step S      at optimizer step S of this run (counted from 0), one rank's scaled loss becomes inf, so its
                     gradients overflow (step 06); rank 0 prints what GradScaler did about it
--die-while-saving   the first snapshot write stops the process half-way (half the bytes, then os._exit(17)),
                     as a power cut or kill -9 would
--other-backend B    the processes of the node torchrun numbered 1 (GROUP_RANK) pick backend B, the device
                     unchanged: as a node with fewer GPUs than processes picks Gloo where the others pick NCCL
"""
import argparse
import importlib.util
import io
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def load_step(script: str):
    path = Path(script) if Path(script).is_file() else REPO / script
    if not path.is_file():
        raise SystemExit(f"error: no step script {script}")
    sys.path.insert(0, str(path.resolve().parent))  # as python does for a script: plumbing.py
    spec = importlib.util.spec_from_file_location("step_under_test", path)
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)  # defines everything; its `if __name__ == "__main__"` part does not run
    return step


def faulty_rank(chosen):
    return dist.get_world_size() - 1 if chosen is None else chosen


def crash_at_epoch(step, crash_epoch: int, chosen_rank, once_file=None):
    run_epoch = step.Trainer._run_epoch

    def _run_epoch(self, epoch):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if once_file is not None:
            first_attempt = first_attempt and not os.path.exists(once_file)
        if epoch == crash_epoch and self.rank == faulty_rank(chosen_rank) and first_attempt:
            if once_file is not None:
                Path(once_file).touch()
            raise RuntimeError(f"simulated crash of rank {self.rank} at epoch {epoch} (tools/faults.py)")
        return run_epoch(self, epoch)

    step.Trainer._run_epoch = _run_epoch


def inf_at_step(step, inf_step: int, chosen_rank):
    run_batch = step.Trainer._run_batch

    def _run_batch(self, source, targets):
        self.steps_run = getattr(self, "steps_run", 0)
        if self.steps_run != inf_step:
            self.steps_run += 1
            return run_batch(self, source, targets)
        weights = [p.detach().clone() for p in self.model.parameters()]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == faulty_rank(chosen_rank):
            real_scale = self.scaler.scale
            self.scaler.scale = lambda loss: real_scale(loss) * float("inf")  # this rank's gradients overflow
        loss = run_batch(self, source, targets)
        self.scaler.__dict__.pop("scale", None)  # back to GradScaler.scale
        changed = any(not torch.equal(w, p) for w, p in zip(weights, self.model.parameters()))
        new_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == 0:
            print(f"{self.tag} Step {inf_step} | inf injected into rank {faulty_rank(chosen_rank)}'s loss | "
                  f"weights changed: {changed} | scale {scale} -> {new_scale}"
                  + (" | GradScaler skipped the step on this rank" if not changed else ""), flush=True)
        self.steps_run += 1
        return loss

    step.Trainer._run_batch = _run_batch


def die_while_saving():
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):  # an in-memory buffer (broadcast_object_list pickles with it)
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os._exit(17)  # no cleanup, no exception handlers: the process is simply gone

    torch.save = save_half_then_die


def other_backend(step, backend: str):
    pick_device = step.pick_device

    def pick(*args, **kwargs):
        device, picked = pick_device(*args, **kwargs)
        return device, backend if os.environ.get("GROUP_RANK") == "1" else picked

    step.pick_device = pick


def main():
    parser = argparse.ArgumentParser(description="Run a torchrun step with one injected fault (tour and tests).",
                                     usage="torchrun ... tools/faults.py FAULT [--rank R] STEP.py [STEP ARGS]")
    fault = parser.add_mutually_exclusive_group(required=True)
    fault.add_argument("--crash-at-epoch", type=int, metavar="E", help="a rank raises at the start of epoch E")
    fault.add_argument("--inf-at-step", type=int, metavar="S", help="a rank's loss is inf at optimizer step S")
    fault.add_argument("--die-while-saving", action="store_true", help="die half-way through the first save")
    fault.add_argument("--other-backend", metavar="B", help="node 1's processes pick backend B")
    parser.add_argument("--rank", type=int, default=None, help="which rank fails (default: the last)")
    parser.add_argument("--once-file", default=None, metavar="F", help="--crash-at-epoch: crash only if F does not "
                        "exist, and create it (for several nodes, whose restart counts differ)")
    parser.add_argument("script", help="the step, e.g. 03_multigpu_torchrun.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the step's own arguments")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: start this with torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
                         "tools/faults.py --crash-at-epoch 3 03_multigpu_torchrun.py")
    step = load_step(args.script)
    if args.crash_at_epoch is not None:
        crash_at_epoch(step, args.crash_at_epoch, args.rank, args.once_file)
    elif args.inf_at_step is not None:
        inf_at_step(step, args.inf_at_step, args.rank)
    elif args.other_backend is not None:
        other_backend(step, args.other_backend)
    else:
        die_while_saving()
    sys.argv = [args.script, *args.script_args]
    step.main(step.parse_args(args.script_args))


if __name__ == "__main__":
    main()
