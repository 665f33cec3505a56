"""Step 02: the same training on several processes with DistributedDataParallel (DDP).

New over step 01:
  * `mp.spawn` starts `world_size` processes, each running `main(rank, ...)`.
  * `init_process_group` connects them (rank 0 listens on MASTER_ADDR:MASTER_PORT).
  * `DistributedSampler` hands each process its own share of every epoch; `set_epoch`
    reshuffles that split each epoch.
  * `DDP` wraps the model: after `backward()` every process holds the gradient
    averaged over all processes, so all copies of the model stay identical.
  * Only rank 0 saves the checkpoint, through `model.module` (the unwrapped model).

    python 02_multigpu_mp_spawn.py                  # all GPUs, or 2 CPU processes
    python 02_multigpu_mp_spawn.py --world_size 4   # 4 processes
"""
import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

# Which communication library a device type uses: NCCL between NVIDIA GPUs
# (XCCL between Intel GPUs); Gloo between CPU processes.
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}
# How long a collective may wait for its peers: a dead peer becomes an error, not a hang.
TIMEOUT = timedelta(minutes=2)


class RegressionDataset(Dataset):
    """Synthetic data made in the script: y = w·x + small noise, so the loss can really fall.

    The data has its own fixed seed, independent of the training seed: every run
    and every process builds exactly the same samples.
    """

    def __init__(self, size: int, in_features: int = 20, noise: float = 0.05):
        g = torch.Generator().manual_seed(1234)
        true_weight = torch.randn(in_features, 1, generator=g)
        self.inputs = torch.randn(size, in_features, generator=g)
        self.targets = self.inputs @ true_weight + noise * torch.randn(size, 1, generator=g)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def pick_device(rank: int):
    """Process `rank` gets GPU number `rank` and NCCL; without GPUs every process uses the CPU and Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type in BACKENDS:
        return torch.device(accelerator.type, rank), BACKENDS[accelerator.type]
    return torch.device("cpu"), "gloo"


def ddp_setup(rank: int, world_size: int, device: torch.device, backend: str):
    """rank: this process's id, 0..world_size-1; world_size: how many processes train together."""
    if device.type == "cpu":
        # N processes sharing the CPU must not each start one thread per core.
        # An OMP_NUM_THREADS you set yourself wins.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    else:
        torch.accelerator.set_device_index(device.index)
    # Every process calls this; they meet at MASTER_ADDR:MASTER_PORT, set in __main__ below.
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)


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
            source, targets = source.to(self.device), targets.to(self.device)
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


def prepare_dataloader(dataset: Dataset, batch_size: int, seed: int):
    # pinned host memory speeds up copies to a GPU; it means nothing without one.
    # DistributedSampler gives each process a disjoint 1/world_size of the samples (it shuffles,
    # so the DataLoader must not). If the data set does not divide evenly, it repeats a few
    # samples so that every process gets the same number of batches.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=torch.cuda.is_available(),
                      sampler=DistributedSampler(dataset, seed=seed))


def main(rank: int, world_size: int, args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    device, backend = pick_device(rank)
    ddp_setup(rank, world_size, device, backend)
    torch.manual_seed(args.seed)  # same initial weights on every run (DDP also copies rank 0's to all)
    if rank == 0:
        print(f"[{device.type}:{rank}] device {device.type} | backend {backend} | world_size {world_size} | "
              f"threads per process {torch.get_num_threads()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, args.seed)
    trainer = Trainer(model, train_data, optimizer, rank, device, args.save_every, args.checkpoint_path,
                      args.log_file)
    trainer.train(args.max_epochs)
    # Wait for every rank before tearing down. While a rank waits here, Gloo's threads finish with its
    # last collective; a thread still holding one of our tensors when Python shuts down aborts the
    # process ("terminate called without an active exception", a PyTorch bug: pytorch/pytorch#179291).
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """Ask the OS for a port nobody uses (binding port 0), so two runs on one machine never collide."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 02: train the toy model on several processes with DDP "
                                                 "(started by mp.spawn).")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="save a checkpoint every N epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and data order")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--checkpoint_path", default="checkpoint.pt", help="where to save (default: checkpoint.pt)")
    parser.add_argument("--log_file", default=None, help="append one JSON line per epoch here (for plots)")
    parser.add_argument("--world_size", type=int, default=None,
                        help="processes to start (default: one per GPU, or 2 on a machine without GPUs)")
    parser.add_argument("--master_port", type=int, default=None,
                        help="port rank 0 listens on (default: a free one)")
    args = parser.parse_args(argv)
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    accelerator = torch.accelerator.current_accelerator(check_available=True)
    gpus = torch.accelerator.device_count() if accelerator is not None and accelerator.type in BACKENDS else 0
    if args.world_size is None:
        args.world_size = gpus or 2
    if args.world_size < 1:
        parser.error("--world_size must be at least 1")
    if gpus and args.world_size > gpus:
        parser.error(f"--world_size {args.world_size} asks for more processes than the {gpus} GPU(s) "
                     f"this machine has; DDP here uses one GPU per process")
    if args.master_port is None:
        args.master_port = free_port()
    elif port_in_use(args.master_port):
        parser.error(f"port {args.master_port} is already in use (another run still going?); "
                     f"pick another --master_port or leave it out to get a free one")
    return args


if __name__ == "__main__":
    args = parse_args()
    # Where rank 0 listens; the spawned processes inherit these variables.
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ["MASTER_PORT"] = str(args.master_port)
    # Start world_size processes; process i runs main(i, world_size, args).
    mp.spawn(main, args=(args.world_size, args), nprocs=args.world_size)
