"""Who am I, which device do I use, and how do I talk to the others.

The same code serves three ways of starting:
  * `python main.py`: one process, no process group, no DDP wrapper;
  * `torchrun ... main.py` (one node or several, or Slurm through torchrun): torchrun sets
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
  * any launcher that sets those variables itself.
"""
import gc
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group: see stop()
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import machine

# How long a collective may wait for its peers: a dead peer becomes an error, not a hang. PyTorch's
# default, 10 minutes: the other ranks wait this long while rank 0 writes a big snapshot.
DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass
class Runtime:
    rank: int  # unique over all nodes
    local_rank: int  # unique on this node: which GPU to use
    world_size: int
    device: torch.device
    backend: Optional[str]  # None: a single process without a process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        # Every line says which process it comes from: "[cpu rank 1]", "[cuda:3 rank 7]" (GPU 3
        # of its node, global rank 7).
        return f"[{self.device} rank {self.rank}]"

    def print(self, message: str, every_rank: bool = False):
        if every_rank or self.is_main:
            print(f"{self.tag} {message}", flush=True)


def pick_device(local_rank: int, local_world_size: int):
    """GPU number `local_rank` and its backend if this node has a GPU for every process; else
    every process uses the CPU and Gloo (2 processes on a laptop or a one-GPU notebook), as in the
    steps."""
    here = machine.Machine.here()
    kind = machine.device_type(here, local_world_size)
    device = torch.device(kind, local_rank) if kind != "cpu" else torch.device("cpu")
    return device, machine.backend(here, local_world_size)


def gpus_here() -> int:
    """GPUs this process can see (0 where the accelerator, if any, has no backend here)."""
    return machine.Machine.here().gpus_with_backend


def start(timeout: timedelta = DEFAULT_TIMEOUT) -> Runtime:
    # One write per printed line, so lines from several processes never mix mid-line (with
    # PYTHONUNBUFFERED=1, print() would otherwise write the text and its newline separately).
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    launched = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device, backend = pick_device(local_rank, local_world_size)
    if device.type == "cpu":
        # N processes sharing the CPU must not each start one thread per core. torchrun sets
        # OMP_NUM_THREADS=1 when it starts several; an OMP_NUM_THREADS you set yourself wins.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, machine.usable_cores() // local_world_size))
    else:
        torch.accelerator.set_device_index(device.index)
    if not launched:
        return Runtime(0, 0, 1, device, None)
    store = store_for_this_attempt(timeout)
    agree_on_backend(store, rank, world_size, local_rank, f"{backend} on {device.type}",
                     f"{gpus_here()} GPU(s) for {local_world_size} process(es)")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type != "cpu" else None)
    return Runtime(rank, local_rank, world_size, device, backend)


def agree_on_backend(store: dist.Store, rank: int, world_size: int, local_rank: int, choice: str,
                     why: str):
    """Every node picks its device and backend alone (pick_device). A node with fewer GPUs than
    processes picks the CPU and Gloo while the others pick their GPUs and NCCL, and
    init_process_group would then wait for peers that never come, until the timeout. So every
    rank posts its choice in the store, rank 0 compares them all and posts the verdict: go on, or
    one line naming what each node picked, which every rank stops with (each node's local rank 0
    prints it)."""
    node = (f"node {os.environ['GROUP_RANK']}" if "GROUP_RANK" in os.environ  # torchrun's node rank
            else socket.gethostname())
    store.set(f"ddp_setup/choice/{rank}", "\t".join((node, choice, why)))
    if rank == 0:
        keys = [f"ddp_setup/choice/{r}" for r in range(world_size)]
        store.wait(keys)
        posted = [tuple(value.decode().split("\t")) for value in store.multi_get(keys)]
        verdict = ""
        if len({choice for _, choice, _ in posted}) > 1:
            groups = {}  # (node, choice, why) -> its ranks
            for r, post in enumerate(posted):
                groups.setdefault(post, []).append(r)
            nodes = [f"{node} (rank{'s' * (len(ranks) > 1)} {spans(ranks)}): {choice}, {why}"
                     for (node, choice, why), ranks in groups.items()]
            verdict = ("the nodes picked different backends and would wait for each other until "
                       f"the timeout: {'; '.join(nodes)}. Give every node one GPU per process "
                       "(torchrun --nproc-per-node), or hide the GPUs on every node "
                       "(CUDA_VISIBLE_DEVICES=) to train on CPUs")
        store.set("ddp_setup/choice_verdict", verdict)
    verdict = store.get("ddp_setup/choice_verdict").decode()
    if verdict:
        if local_rank == 0:
            print(f"error: {verdict}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def spans(ranks: list) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs = []  # [first, last] of consecutive ranks
    for r in ranks:
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in runs)


def store_for_this_attempt(timeout: timedelta) -> dist.Store:
    """env://'s key-value store (where the processes swap addresses), with this attempt's own keys.

    torchrun keeps one store for the whole job when it restarts the processes (--max-restarts),
    and init_process_group writes the same keys on every attempt: a restarted process can read an
    address a dead predecessor left there and fail ("Connection refused"; pytorch/pytorch#135712).
    So every process counts its rank's starts in the store, and its keys go under that number.
    torchrun restarts all processes together, so every rank counts the same. (Not
    TORCHELASTIC_RESTART_COUNT: on several nodes torchrun counts a restart only on the node whose
    process failed, and the nodes would disagree.)
    """
    store, rank, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = store.add(f"ddp_setup/starts_of_rank_{rank}", 1)
    return dist.PrefixStore(f"attempt_{attempt}", store)


# The meshes device_mesh() made: stop() takes their process groups away from them.
_meshes = []


def device_mesh(rt: Runtime) -> DeviceMesh:
    """All ranks in one dimension, on this rank's device type: where FSDP puts its shards."""
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    _meshes.append(mesh)
    return mesh


def stop(rt: Runtime):
    """Tear the process group down; called from a `finally:`, so also when this rank is failing.

    The caller drops its model first (DDP and FSDP hold the group), and torch.distributed.nn is
    imported above, before any group exists (imported later, its functions keep the default
    group in their default arguments). FSDP's modules and their state refer to each other: a
    dropped FSDP model is freed only by the garbage collector, run here. A DeviceMesh keeps its
    groups too (torch 2.13: `_pg_registry`) and outlives the model (DTensor's caches keep it): its
    groups are taken away from it. Then nothing else holds the group, and destroying it joins
    Gloo's worker threads while Python is fully alive. One still running at exit can abort a
    finished run (tools/exit_abort/FINDINGS.md); one that must give its last tensor back to a
    model being deleted can deadlock.
    """
    for mesh in _meshes:
        getattr(mesh, "_pg_registry", {}).clear()
    _meshes.clear()
    gc.collect()
    if rt.distributed and dist.is_initialized():
        if sys.exc_info()[0] is None:  # a failing rank must not wait for peers that may be gone
            dist.barrier()  # every rank leaves together
        dist.destroy_process_group()


def gather_strings(rt: Runtime, value: str) -> list:
    """Every rank's `value`, in rank order (just [value] without a process group)."""
    if not rt.distributed:
        return [value]
    values = [None] * rt.world_size
    dist.all_gather_object(values, value)
    return values


def sum_across_ranks(rt: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """In place, and returned. (Gloo has no AVG reduction, so callers divide themselves.)"""
    if rt.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
