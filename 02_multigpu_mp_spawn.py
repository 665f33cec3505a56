"""Step 02: the same training on several processes with DistributedDataParallel (DDP).

New over step 01: `mp.spawn` starts the processes, `init_process_group` connects them,
`DistributedSampler` gives each its own share of the data, and `DDP` averages gradients.

    python 02_multigpu_mp_spawn.py                  # one process per GPU, or 2 on the CPU
    python 02_multigpu_mp_spawn.py --world_size 4   # 4 processes
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

# The communication library between processes: NCCL for NVIDIA GPUs, XCCL for Intel GPUs, else Gloo (CPU).
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}


class RegressionDataset(Dataset):
    """y = w·x + small noise, made here from a fixed seed of its own: every run and process gets the same samples."""

    def __init__(self, size: int, in_features: int = 20, noise: float = 0.05):
        g = torch.Generator().manual_seed(1234)
        true_weight = torch.randn(in_features, 1, generator=g)
        self.inputs = torch.randn(size, in_features, generator=g)
        self.targets = self.inputs @ true_weight + noise * torch.randn(size, 1, generator=g)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def pick_device(gpu_index: int, processes_per_node: int):
    """GPU number `gpu_index` and NCCL if this node has a GPU for every process; else all use the CPU and Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    gpus = torch.accelerator.device_count() if accelerator is not None and accelerator.type in BACKENDS else 0
    if gpus < processes_per_node:
        return torch.device("cpu"), "gloo"
    return torch.device(accelerator.type, gpu_index), BACKENDS[accelerator.type]


def ddp_setup(rank: int, world_size: int, device: torch.device, backend: str):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    dist.init_process_group(backend, rank=rank, world_size=world_size)  # they meet at MASTER_ADDR:MASTER_PORT


class Trainer:
    def __init__(self, model, train_data, optimizer, rank, device, save_every, checkpoint_path, log_file):
        self.rank = rank
        self.device = device
        self.tag = f"[{device.type}:{rank}]"  # every line says which process it comes from
        # DDP keeps the copies in step: it averages gradients across processes during backward().
        self.model = DDP(model.to(device), device_ids=None if device.type == "cpu" else [device.index])
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
        self.train_data.sampler.set_epoch(epoch)  # without it, every epoch would see the same split and order
        total_loss = torch.zeros((), device=self.device)
        for source, targets in self.train_data:
            # non_blocking: from pinned memory, the copy to a GPU overlaps with work already queued
            source, targets = source.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            total_loss += self._run_batch(source, targets)
        steps = len(self.train_data)
        loss = total_loss.item() / steps  # one device->host copy per epoch, not per batch
        print(f"{self.tag} Epoch {epoch} | Batchsize {batch_size} | Steps {steps} | loss {loss:.4f}")
        return {"epoch": epoch, "batch_size": batch_size, "steps": steps, "loss": loss,
                "world_size": dist.get_world_size()}

    def _save_checkpoint(self, epoch):
        # Write to a temporary file, then rename: a crash mid-write never leaves a half file behind.
        tmp_path = f"{self.checkpoint_path}.tmp.{os.getpid()}"
        torch.save(self.model.module.state_dict(), tmp_path)  # .module: the model inside the DDP wrapper
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
            # All copies are identical, so one process saving is enough.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_checkpoint(epoch)
        if self.rank == 0:
            print(f"{self.tag} Finished training: {max_epochs} epochs")


def load_train_objs(args):
    train_set = RegressionDataset(args.dataset_size)
    model = torch.nn.Sequential(  # a small dense network: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return train_set, model, optimizer


def prepare_dataloader(dataset: Dataset, batch_size: int, device: torch.device, seed: int):
    # pinned (page-locked) host memory speeds up copies to a CUDA GPU; it means nothing for the CPU
    # DistributedSampler: each process gets its own shuffled 1/world_size of the samples; the DataLoader mustn't shuffle
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda",
                      sampler=DistributedSampler(dataset, seed=seed))


def main(rank: int, world_size: int, args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    device, backend = pick_device(rank, world_size)
    ddp_setup(rank, world_size, device, backend)
    torch.manual_seed(args.seed)  # same initial weights and data order on every run
    print(f"[{device.type}:{rank}] device {device.type} | backend {backend} | world_size {world_size} | "
          f"GPUs here {torch.accelerator.device_count()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device, args.seed)
    trainer = Trainer(model, train_data, optimizer, rank, device, args.save_every, args.checkpoint_path,
                      args.log_file)
    trainer.train(args.max_epochs)
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 02: train the toy model on several processes with DDP.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="save a checkpoint every N epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and data order")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--checkpoint_path", default="checkpoint.pt", help="where to save (default: checkpoint.pt)")
    parser.add_argument("--log_file", default=None, help="append one JSON line per epoch here (for plots)")
    parser.add_argument("--world_size", type=int, default=max(2, torch.accelerator.device_count()),
                        help="processes to start (default: one per GPU where there are 2 or more, else 2)")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards and conveniences: clear one-line errors for bad input. Not the lesson; read them last. ----------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size", "world_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


if __name__ == "__main__":
    args = parse_args()
    # Where rank 0 listens (yours, if you set these variables); the spawned processes inherit them.
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "12355")
    mp.spawn(main, args=(args.world_size, args), nprocs=args.world_size)  # process i runs main(i, ...)
