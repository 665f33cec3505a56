"""Helpers for the step tests: what N data-parallel processes must compute, computed in one
process (train_on_union), and the README's commands as the tests run them (readme_command).

What N data-parallel processes must compute:

DDP averages the gradients of N ranks. With batches of equal size (the steps' DistributedSampler
gives every rank the same number of samples), that average is the gradient of the mean loss over
the union of the N batches. So N ranks must end where one process ends that takes, at every step,
one optimizer step on the union of the batches the N ranks' samplers hand out (each sampler built
with num_replicas=N and its rank, and set_epoch called every epoch).

A step that forgets set_epoch, shards the data another way, averages a loss over one rank only,
resumes from the wrong epoch or loses the optimizer's momentum ends somewhere else.
"""
import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the steps import plumbing.py from beside them
# A run's time limit: on this 2-core machine, shared with other work (load average 20-30), one
# 2-process run of a step took up to 180 s; alone, 8-15 s.
LAUNCH_TIMEOUT_S = 400


def train_on_union(step, world_size: int, epochs: int, clip: float = None, **settings):
    """Train step's model (load_train_objs) as `world_size` DDP ranks would, in one process.

    Returns (model state dict, [per-epoch record]) where a record has "loss" (the mean over all
    ranks and steps of the batch losses), "loss_rank0" (rank 0's own mean) and, for steps with a
    validation split, "val_loss" (the whole split's mean squared error after the epoch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    try:
        return _train_on_union(step, world_size, epochs, clip, settings)
    finally:
        torch.set_num_threads(threads)


def _train_on_union(step, world_size, epochs, clip, settings):
    args = argparse.Namespace(**{"lr": 0.01, "seed": 0, "dataset_size": 4096, "batch_size": 32,
                                 "val_fraction": 0.1, **settings})
    torch.manual_seed(args.seed)  # the steps seed the same way before building the model
    objects = step.load_train_objs(args)
    train_set, model, optimizer = objects[0], objects[-2], objects[-1]
    val_set = objects[1] if len(objects) == 4 else None
    samplers = [DistributedSampler(train_set, num_replicas=world_size, rank=r)
                for r in range(world_size)]
    train_x, train_y = stack(train_set, range(len(train_set)))
    records = []
    for epoch in range(epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in samplers]
        losses = []  # [step][rank]
        for start in range(0, len(shares[0]), args.batch_size):
            picks = [torch.tensor(share[start:start + args.batch_size]) for share in shares]
            batches = [(train_x[pick], train_y[pick]) for pick in picks]
            optimizer.zero_grad()
            outputs = [model(inputs) for inputs, _ in batches]
            per_rank = [F.mse_loss(out, targets) for out, (_, targets) in zip(outputs, batches)]
            torch.stack(per_rank).mean().backward()  # DDP: the mean of the ranks' gradients
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
            optimizer.step()
            losses.append([loss.item() for loss in per_rank])
        record = {"epoch": epoch, "loss": sum(map(sum, losses)) / (len(losses) * world_size),
                  "loss_rank0": sum(step_losses[0] for step_losses in losses) / len(losses)}
        if val_set is not None:
            inputs, targets = stack(val_set, range(len(val_set)))
            with torch.no_grad():
                record["val_loss"] = F.mse_loss(model(inputs), targets).item()
        records.append(record)
    return model.state_dict(), records


def stack(dataset, indices):
    samples = [dataset[i] for i in indices]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def readme_command(line: str, observe=(), extra=(), torchrun_options=()) -> list:
    """A command line the README shows, as a test runs it: `python` and `torchrun` from this
    virtualenv, scripts by their path, tools/faults.py in front of the step with the tests'
    observations (e.g. --dump-ranks DIR), extra arguments for the step at the end, and
    torchrun_options (e.g. --max-restarts 1) after torchrun's own."""
    words = shlex.split(line)
    launcher = {"python": [sys.executable],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[words[0]]
    step = next(i for i, w in enumerate(words) if w.endswith(".py") and w != "tools/faults.py")
    options = words[1:step]  # torchrun's, and tools/faults.py with its faults if the README has it
    at = options.index("tools/faults.py") if "tools/faults.py" in options else len(options)
    options[at:at] = [str(o) for o in torchrun_options]
    if "tools/faults.py" not in options:
        options.append("tools/faults.py")
    after_faults = options.index("tools/faults.py") + 1
    options[after_faults:after_faults] = [str(o) for o in observe]
    return [*launcher, *[str(REPO / w) if w.endswith(".py") else w for w in options],
            str(REPO / words[step]), *words[step + 1:], *[str(e) for e in extra]]
