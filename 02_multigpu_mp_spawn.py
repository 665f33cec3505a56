"""Step 02: the same training on several processes with DistributedDataParallel (DDP).

New over step 01: `mp.spawn` starts the processes, `init_process_group` connects them,
`DistributedSampler` gives each its own share of the data, and `DDP` averages gradients.

    python 02_multigpu_mp_spawn.py --world_size 4   # default: one process per GPU, or 2 CPU ones
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from plumbing import RegressionDataset  # the toy data set: y = w·x + noise

BACKENDS = {"cuda": "nccl", "xpu": "xccl"}  # how NVIDIA or Intel GPUs talk; CPUs use Gloo


def pick_device(gpu_index: int, processes_per_node: int):
    """GPU `gpu_index` with NCCL if this node has a GPU per process; else the CPU with Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    has_gpus = accelerator is not None and accelerator.type in BACKENDS
    if not has_gpus or torch.accelerator.device_count() < processes_per_node:
        return torch.device("cpu"), "gloo"
    return torch.device(accelerator.type, gpu_index), BACKENDS[accelerator.type]


def ddp_setup(rank: int, world_size: int, device: torch.device, backend: str):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    dist.init_process_group(backend, rank=rank, world_size=world_size)


class Trainer:
    def __init__(self, model, train_data, optimizer, device, save_every, checkpoint_path,
                 log_file):
        self.rank = dist.get_rank()  # this process's number: 0 .. world_size - 1
        self.device = device
        self.tag = f"[{device} rank {self.rank}]"  # every line says which process it comes from
        self.model = DDP(model.to(device))  # backward() averages the gradients of all processes
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.checkpoint_path = checkpoint_path
        self.log_file = log_file

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

    def _save_checkpoint(self, epoch):
        # To a temporary file, then renamed: a crash mid-write never leaves a half file behind.
        tmp_path = f"{self.checkpoint_path}.tmp.{os.getpid()}"
        torch.save(self.model.module.state_dict(), tmp_path)  # .module: the model inside DDP
        os.replace(tmp_path, self.checkpoint_path)
        print(f"{self.tag} Epoch {epoch} | Training checkpoint saved at {self.checkpoint_path}")

    def train(self, max_epochs: int):
        for epoch in range(max_epochs):
            start = time.perf_counter()
            record = self._run_epoch(epoch)
            record["epoch_time_s"] = time.perf_counter() - start
            if self.rank == 0 and self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # All copies are the same: one process saving is enough.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_checkpoint(epoch)
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


def main(rank: int, world_size: int, args):
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # one write per whole line
    device, backend = pick_device(rank, world_size)
    ddp_setup(rank, world_size, device, backend)
    torch.manual_seed(args.seed)  # the same initial weights on every run
    print(f"[{device} rank {rank}] device {device.type} | backend {backend}"
          f" | world_size {world_size} | GPUs here {torch.accelerator.device_count()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device)
    trainer = Trainer(model, train_data, optimizer, device, args.save_every,
                      args.checkpoint_path, args.log_file)
    trainer.train(args.max_epochs)
    del trainer  # DDP holds the group: drop it first, so that destroying it ends Gloo's threads
    dist.destroy_process_group()


def spawn(args):
    # Where rank 0 listens (yours, if you set these variables); the processes inherit them.
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "12355")
    mp.spawn(main, args=(args.world_size, args), nprocs=args.world_size)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 02: train the toy model on processes, DDP.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="epochs per save (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples (default: 4096)")
    parser.add_argument("--checkpoint_path", default="checkpoint.pt", help="where to save")
    parser.add_argument("--log_file", default=None, help="append a JSON line per epoch (for plots)")
    parser.add_argument("--world_size", type=int, default=max(2, torch.accelerator.device_count()),
                        help="processes to start (default: one per GPU if 2 or more, else 2)")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards: argument checks, one line each. Not the lesson: read them last. ---------------------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size", "world_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


if __name__ == "__main__":
    spawn(parse_args())
