"""What every step needs and none of them teaches: the toy data set, torchrun's store made safe
for restarts (with a check that all nodes picked the same backend), and one-line errors.

The steps import it (`from plumbing import ...`), as the official PyTorch DDP series imports
its datautils.py; keep it next to them.
"""
import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group: see the note below
from torch.utils.data import Dataset

# Imported first after init_process_group (DDP's constructor does, through torch._dynamo),
# torch.distributed.nn's functions keep the default group in their default arguments for good:
# destroy_process_group() then leaves Gloo's threads running into Python's exit, where one may
# abort the process after a finished run (TROUBLESHOOTING.md, "Aborted at exit").


class RegressionDataset(Dataset):
    """y = w·x + small noise, from a fixed seed of its own: every run and process gets the same."""

    def __init__(self, size: int, in_features: int = 20, noise: float = 0.05):
        g = torch.Generator().manual_seed(1234)
        true_weight = torch.randn(in_features, 1, generator=g)
        self.inputs = torch.randn(size, in_features, generator=g)
        self.targets = self.inputs @ true_weight + noise * torch.randn(size, 1, generator=g)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def restart_safe_store(backend: str, timeout: timedelta) -> dict:
    """The store, rank and world size for init_process_group(**...) under torchrun.

    torchrun's key-value store (at MASTER_ADDR:MASTER_PORT) outlives a restart, and
    init_process_group writes each rank's address under the same keys every time: a restarted
    process can read an address a dead one left and fail ("Gloo connectFullMesh failed ...
    Connection refused", pytorch/pytorch#135712). Measured on torch 2.13 with
    tools/restart_check.py, 30 planned restarts: with plain env://, 5 of 7 attempts failed on
    one node and 13 of 23 on two, until the job gave up; with a prefix per attempt, 31 of 31
    met, on one node and on two. Each rank counts its own starts in the store (torchrun's
    TORCHELASTIC_RESTART_COUNT grows only on the node whose process failed); all ranks restart
    together, so their counts agree.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"attempt_{store.add(f'starts_of_rank_{rank}', 1)}", store)
    check_backends_agree(store, world_size, backend)
    return {"store": store, "rank": rank, "world_size": world_size}


def check_backends_agree(store, world_size: int, backend: str):
    """Each node picks its device alone: a node with fewer GPUs than processes picks Gloo where
    the others pick NCCL, and they would wait for each other until the timeout. Every rank
    says what it picked; once all have, a rank that sees a disagreement stops in one line."""
    store.add(f"picked_{backend}", 1)
    if store.add("ranks_that_picked", 1) == world_size:  # the last one to pick
        store.set("all_picked", "")
    store.wait(["all_picked"])
    picked = {name: store.add(f"picked_{name}", 0) for name in ("gloo", "nccl", "xccl")}
    if picked[backend] < world_size:
        counts = ", ".join(f"{n} {name}" for name, n in picked.items() if n)
        raise SystemExit(f"error: the nodes picked different backends ({counts}; this one "
                         f"{backend}): give every node a GPU for each of its processes, or hide "
                         f"the GPUs of all (CUDA_VISIBLE_DEVICES=)")


@contextlib.contextmanager
def refused_if_damaged(path):
    """torch.load of a damaged file: one line and exit code 1, not a traceback."""
    try:
        yield
    except Exception as e:
        raise SystemExit(f"error: cannot resume from snapshot {path}: it is corrupt or truncated "
                         f"({type(e).__name__}); delete it to start afresh") from None
