"""Step 03: launch with torchrun; save snapshots and resume from them.

New over step 02: `torchrun` starts the processes, on one node or many, and sets RANK, LOCAL_RANK, WORLD_SIZE;
a snapshot (model, optimizer, epochs run), saved atomically, is sent from rank 0 to every rank at start, so
all resume from it; with `--max-restarts`, processes restarted after a failure resume from the last snapshot.

    torchrun --standalone --nproc-per-node 2 03_multigpu_torchrun.py
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 03_multigpu_torchrun.py --max_epochs 50
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


def ddp_setup(device: torch.device, backend: str, timeout: timedelta):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; why not plain env:// here: see the file's end
    store, rank, world_size = store_for_this_attempt(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class Trainer:
    def __init__(self, model, train_data, optimizer, rank, device, save_every, snapshot_path, log_file):
        self.rank = rank
        self.device = device
        self.tag = f"[{device.type}:{rank}]"  # every line says which process it comes from
        # DDP keeps the copies in step: it averages gradients across processes during backward().
        self.model = DDP(model.to(device), device_ids=None if device.type == "cpu" else [device.index])
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.log_file = log_file
        self.epochs_run = 0
        self._load_snapshot()

    def _load_snapshot(self):
        # Only rank 0 saves, so only rank 0 reads (with weights_only=True: see read_snapshot). It sends what it
        # read to every rank: all resume from the same point, whatever the other nodes' disks hold.
        has_one = self.rank == 0 and os.path.exists(self.snapshot_path)
        snapshot = [read_snapshot(self.snapshot_path) if has_one else None]
        dist.broadcast_object_list(snapshot, src=0)
        if snapshot[0] is None:
            return  # nothing to resume from: start afresh
        self.model.module.load_state_dict(snapshot[0]["model"])
        self.optimizer.load_state_dict(snapshot[0]["optimizer"])
        self.epochs_run = snapshot[0]["epochs_run"]
        print(f"{self.tag} Resuming training from snapshot {self.snapshot_path} at Epoch {self.epochs_run}")

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

    def _save_snapshot(self, epoch):
        snapshot = {"model": self.model.module.state_dict(),  # .module: the model inside the DDP wrapper
                    "optimizer": self.optimizer.state_dict(),  # momentum buffers: needed to resume exactly
                    "epochs_run": epoch + 1}
        # Write to a temporary file, then rename: a crash mid-write never leaves a half file behind.
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
            # All copies are identical, so one process saving is enough.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
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


def main(args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    device, backend = pick_device(int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    ddp_setup(device, backend, timedelta(minutes=args.timeout_min))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same initial weights and data order on every run
    print(f"[{device.type}:{rank}] device {device.type} | backend {backend} | world_size {world_size} | "
          f"GPUs here {torch.accelerator.device_count()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device, args.seed)
    trainer = Trainer(model, train_data, optimizer, rank, device, args.save_every, args.snapshot_path,
                      args.log_file)
    trainer.train(args.max_epochs)
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 03: DDP under torchrun, with snapshots and resume.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="save a snapshot every N epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and data order")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--snapshot_path", default="snapshot.pt", help="saved here; resumed from if it exists")
    parser.add_argument("--log_file", default=None, help="append one JSON line per epoch here (for plots)")
    parser.add_argument("--timeout_min", type=float, default=10, help="minutes to wait for a slow or dead rank")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards and conveniences: clear one-line errors for bad input. Not the lesson; read them last. ----------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def store_for_this_attempt(timeout: timedelta):
    # env://'s store, keys per attempt: torchrun keeps one store across restarts, where restarted processes could read
    # addresses dead ones left (pytorch/pytorch#135712). Counted in the store, as nodes count their restarts apart.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"attempt_{store.add(f'starts_of_rank_{rank}', 1)}", store), rank, world_size


def read_snapshot(path: str):
    """torch.load with weights_only=True (tensors and numbers, never code to run); a damaged file: one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot resume from snapshot {path}: it is corrupt or truncated "
                         f"({str(e).split('. ')[0].strip()}); delete it to start afresh") from None


if __name__ == "__main__":
    args = parse_args()
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: use torchrun: torchrun --standalone --nproc-per-node 2 03_multigpu_torchrun.py")
    main(args)
