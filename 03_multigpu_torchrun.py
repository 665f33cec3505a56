"""Step 03: launch with torchrun; save snapshots and resume from them.

New over step 02: `torchrun` starts the processes (on one or several nodes) and sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE. Rank 0 saves snapshots (model, optimizer, epochs run)
that every rank resumes from, also when torchrun restarts them after a failure (--max-restarts).

    torchrun --standalone --nproc-per-node 2 03_multigpu_torchrun.py
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 03_multigpu_torchrun.py
"""
import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from plumbing import RegressionDataset, refused_if_damaged, restart_safe_store

BACKENDS = {"cuda": "nccl", "xpu": "xccl"}  # how NVIDIA or Intel GPUs talk; CPUs use Gloo


def pick_device(gpu_index: int, processes_per_node: int):
    """GPU `gpu_index` with NCCL if this node has a GPU per process; else the CPU with Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    has_gpus = accelerator is not None and accelerator.type in BACKENDS
    if not has_gpus or torch.accelerator.device_count() < processes_per_node:
        return torch.device("cpu"), "gloo"
    return torch.device(accelerator.type, gpu_index), BACKENDS[accelerator.type]


def ddp_setup(device: torch.device, backend: str, timeout: timedelta):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; restart_safe_store: plumbing.py
    dist.init_process_group(backend, timeout=timeout, **restart_safe_store(backend, timeout))


class Trainer:
    def __init__(self, model, train_data, optimizer, device, save_every, snapshot_path,
                 log_file):
        self.rank = dist.get_rank()  # this process's number: 0 .. world_size - 1
        self.device = device
        self.tag = f"[{device} rank {self.rank}]"  # every line says which process it comes from
        self.model = DDP(model.to(device))  # backward() averages the gradients of all processes
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.log_file = log_file
        self.epochs_run = self._load_snapshot()  # 0, or the epochs the last snapshot holds

    def _load_snapshot(self):
        # Rank 0 reads what it saved and sends it to every rank: all resume from the same point
        snapshot = [None]  # broadcast_object_list fills a list in place
        if self.rank == 0 and os.path.exists(self.snapshot_path):
            with refused_if_damaged(self.snapshot_path):  # weights_only: tensors, never code
                snapshot[0] = torch.load(self.snapshot_path, map_location="cpu", weights_only=True)
        dist.broadcast_object_list(snapshot, src=0)
        if snapshot[0] is None:
            return 0  # nothing to resume from: start afresh
        self.model.module.load_state_dict(snapshot[0]["model"])
        self.optimizer.load_state_dict(snapshot[0]["optimizer"])
        print(f"{self.tag} Resuming from {self.snapshot_path} at Epoch {snapshot[0]['epochs_run']}")
        return snapshot[0]["epochs_run"]

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = F.mse_loss(output, targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _run_epoch(self, epoch):
        batch_size = self.train_data.batch_size
        self.train_data.sampler.set_epoch(epoch)  # else each epoch repeats the same split and order
        total_loss = torch.zeros((), device=self.device)
        for source, targets in self.train_data:
            # non_blocking: from pinned memory, the copy to a GPU overlaps with work already queued
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            total_loss += self._run_batch(source, targets)
        steps = len(self.train_data)
        loss = total_loss.item() / steps  # one device->host copy per epoch, not per batch
        print(f"{self.tag} Epoch {epoch} | Batchsize {batch_size} | Steps {steps} | "
              f"loss {loss:.4f}")
        return {"epoch": epoch, "batch_size": batch_size, "steps": steps, "loss": loss,
                "world_size": dist.get_world_size()}

    def _save_snapshot(self, epoch):
        snapshot = {"model": self.model.module.state_dict(),  # .module: the model inside DDP
                    "optimizer": self.optimizer.state_dict(),  # momentum: to resume exactly
                    "epochs_run": epoch + 1}
        # To a temporary file, then renamed: a crash mid-write never leaves a half file behind.
        tmp_path = f"{self.snapshot_path}.tmp.{os.getpid()}"
        torch.save(snapshot, tmp_path)
        os.replace(tmp_path, self.snapshot_path)
        print(f"{self.tag} Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def train(self, max_epochs: int):
        for epoch in range(self.epochs_run, max_epochs):
            start = time.perf_counter()
            record = self._run_epoch(epoch)
            record["epoch_time_s"] = time.perf_counter() - start
            if self.rank == 0 and self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # All copies are the same: one process saving is enough.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
        print(f"{self.tag} Finished training: {max_epochs} epochs")


def load_train_objs(args):
    train_set = RegressionDataset(args.dataset_size)
    model = torch.nn.Sequential(  # a small dense network: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return train_set, model, optimizer


def prepare_dataloader(dataset: Dataset, batch_size: int, device: torch.device):
    # pinned (page-locked) host memory speeds up copies to a CUDA GPU; it means nothing for the CPU
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,  # the sampler shuffles
                      sampler=DistributedSampler(dataset),  # a share of its own per process
                      pin_memory=device.type == "cuda")


def main(args):
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # one write per whole line
    local_rank, processes_here = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device, backend = pick_device(local_rank, processes_here)
    ddp_setup(device, backend, timedelta(minutes=args.timeout_min))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every run
    print(f"[{device} rank {rank}] device {device.type} | backend {backend}"
          f" | world_size {world_size} | GPUs here {torch.accelerator.device_count()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device)
    trainer = Trainer(model, train_data, optimizer, device, args.save_every,
                      args.snapshot_path, args.log_file)
    trainer.train(args.max_epochs)
    del trainer  # DDP holds the group: drop it first, so that destroying it ends Gloo's threads
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 03: DDP under torchrun, snapshots, resume.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="epochs per save (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples (default: 4096)")
    parser.add_argument("--snapshot_path", default="snapshot.pt", help="saved, and resumed from")
    parser.add_argument("--log_file", default=None, help="append a JSON line per epoch (for plots)")
    parser.add_argument("--timeout_min", type=float, default=10, help="minutes before a hang fails")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards: argument checks, one line each. Not the lesson: read them last. ---------------------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if "LOCAL_RANK" not in os.environ:  # started by plain python, not by torchrun
        parser.error(f"use torchrun: torchrun --standalone --nproc-per-node 2 {parser.prog}")
    return args


if __name__ == "__main__":
    main(parse_args())
