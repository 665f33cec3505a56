"""Step 06: step 05 with automatic mixed precision (AMP): 16-bit matmuls, float32 where it matters.

New over step 05: `torch.autocast` runs matmuls in bf16 or fp16, losses and reductions in float32;
weights, gradients and optimizer stay float32. `--dtype`: fp32, bf16 (float32's range: no scaler;
the default where the hardware has it) or fp16, whose small range needs a `GradScaler`: it scales
the loss up so small gradients survive, divides it out (`unscale_`) before clipping, and skips a
step whose gradients overflowed (on every rank: they share the averaged gradients).

    torchrun --standalone --nproc-per-node 2 06_amp.py --dtype fp32
    torchrun --standalone --nproc-per-node 2 06_amp.py --dtype bf16
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
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from plumbing import RegressionDataset, refused_if_damaged, restart_safe_store

BACKENDS = {"cuda": "nccl", "xpu": "xccl"}  # how NVIDIA or Intel GPUs talk; CPUs use Gloo
# The cores this process may run on: fewer than the machine has under taskset, Slurm, a container
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def pick_device(gpu_index: int, processes_per_node: int, cpu: bool = False):
    """GPU `gpu_index` with NCCL if this node has a GPU per process; else the CPU with Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    has_gpus = accelerator is not None and accelerator.type in BACKENDS
    if cpu or not has_gpus or torch.accelerator.device_count() < processes_per_node:
        return torch.device("cpu"), "gloo"
    return torch.device(accelerator.type, gpu_index), BACKENDS[accelerator.type]


def threads_per_process(wanted, processes_here: int) -> int:
    """--threads, else this node's usable cores shared out among its processes (at least 1)."""
    return wanted or max(1, USABLE_CORES // processes_here)


def ddp_setup(device: torch.device, backend: str, timeout: timedelta):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; restart_safe_store: plumbing.py
    dist.init_process_group(backend, timeout=timeout, **restart_safe_store(backend, timeout))


class Trainer:
    def __init__(self, model, train_data, val_data, optimizer, device, save_every, snapshot_path,
                 log_file, dtype):
        self.rank = dist.get_rank()  # this process's number: 0 .. world_size - 1
        self.device = device
        self.tag = f"[{device} rank {self.rank}]"  # every line says which process it comes from
        self.model = DDP(model.to(device))  # backward() averages the gradients of all processes
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # else off
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
        self.scaler.load_state_dict(snapshot[0]["scaler"])  # the scale it had reached
        print(f"{self.tag} Resuming from {self.snapshot_path} at Epoch {snapshot[0]['epochs_run']}")
        return snapshot[0]["epochs_run"]

    def autocast(self):  # the forward pass and the loss; backward() follows the same choices
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        with self.autocast():
            output = self.model(source)
            loss = F.mse_loss(output, targets)  # autocast computes losses in float32
        self.scaler.scale(loss).backward()  # loss x scale: small fp16 gradients do not round to 0
        self.scaler.unscale_(self.optimizer)  # the scale divided out: clipping sees true gradients
        # The gradients are averaged now, the same on every rank, so every rank clips alike:
        # a rare huge gradient (a bad batch) cannot throw the weights far.
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=5.0)
        self.scaler.step(self.optimizer)  # skips optimizer.step() if a gradient is inf or NaN
        self.scaler.update()  # halves the scale after an overflow, doubles it after 2000 good steps
        return loss.detach()

    @torch.no_grad()
    def _validate(self):
        """Mean squared error over the WHOLE validation set, each sample once, any world size."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of errors, samples]
        for source, targets in self.val_data:
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.autocast():  # evaluation gets the same speed-up
                output = self.model.module(source)  # no gradients: nothing for DDP to synchronize
                totals[0] += F.mse_loss(output, targets, reduction="sum").double()
            totals[1] += targets.numel()
        dist.all_reduce(totals)  # each rank scored its own share: add up every rank's sums
        self.model.train()
        return (totals[0] / totals[1]).item()

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
        dist.all_reduce(total_loss)  # every rank ran `steps` batches: the mean over all of them
        loss = total_loss.item() / (steps * dist.get_world_size())  # one device->host copy
        val_loss = self._validate()
        scale = self.scaler.get_scale()  # GradScaler's factor; 1 when it is off
        if self.rank == 0:  # every rank has the same numbers now
            print(f"{self.tag} Epoch {epoch} | Batchsize {batch_size} | Steps {steps} | "
                  f"loss {loss:.4f} | val loss {val_loss:.4f} | scale {scale:g}")
        return {"epoch": epoch, "batch_size": batch_size, "steps": steps, "loss": loss,
                "val_loss": val_loss, "world_size": dist.get_world_size(), "scale": scale}

    def _save_snapshot(self, epoch):
        snapshot = {"model": self.model.module.state_dict(),  # .module: the model inside DDP
                    "optimizer": self.optimizer.state_dict(),  # momentum: to resume exactly
                    "epochs_run": epoch + 1,
                    "scaler": self.scaler.state_dict()}  # the scale reached (empty when off)
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
    # A validation split from a seed of its own: the same on every rank, whatever --seed says
    dataset = RegressionDataset(args.dataset_size)
    val_size = max(1, round(len(dataset) * args.val_fraction))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(4321)).tolist()
    train_set, val_set = Subset(dataset, order[val_size:]), Subset(dataset, order[:val_size])
    model = torch.nn.Sequential(  # a small dense network: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return train_set, val_set, model, optimizer


def prepare_dataloader(dataset: Dataset, batch_size: int, device: torch.device):
    # pinned (page-locked) host memory speeds up copies to a CUDA GPU; it means nothing for the CPU
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,  # the sampler shuffles
                      sampler=DistributedSampler(dataset),  # a share of its own per process
                      pin_memory=device.type == "cuda")


def pick_dtype(name, device: torch.device) -> str:
    """--dtype, else bf16 where the hardware computes in it (Ampere and newer GPUs, CPUs with
    AVX512-BF16 or AMX), else fp16 on a GPU and fp32 on a CPU (emulated bf16 is slower)."""
    if device.type == "cpu":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return name or ("bf16" if native_bf16 else "fp32")  # --dtype bf16 works, maybe slowly
    native_bf16 = device.type == "xpu" or torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bf16" and not native_bf16:  # a T4 or V100 emulates it, slower than fp32
        raise SystemExit("error: this GPU has no native bfloat16; use --dtype fp16 or fp32")
    return name or ("bf16" if native_bf16 else "fp16")


def main(args):
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # one write per whole line
    local_rank, processes_here = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device, backend = pick_device(local_rank, processes_here, args.cpu)
    dtype = pick_dtype(args.dtype, device)
    ddp_setup(device, backend, timedelta(minutes=args.timeout_min))
    if device.type == "cpu":  # wins over OMP_NUM_THREADS (torchrun's default: 1 per process)
        torch.set_num_threads(threads_per_process(args.threads, processes_here))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every run
    print(f"[{device} rank {rank}] device {device.type} | backend {backend}"
          f" | world_size {world_size} | GPUs here {torch.accelerator.device_count()}")
    if rank == 0:
        print(f"[{device} rank 0] precision {dtype}: " + ("autocast off" if dtype == "fp32" else
              f"autocast {DTYPES[dtype]} | GradScaler " + ("on" if dtype == "fp16" else "off")))
    if device.type == "cpu" and local_rank == 0:  # one line per node: each has its own cores
        threads = torch.get_num_threads()
        too_many = processes_here * threads > USABLE_CORES  # still correct, only slower
        print(f"[cpu rank {rank}] this node: {processes_here} processes x {threads} thread(s) on "
              f"{USABLE_CORES} usable core(s)" + (" | oversubscribed" if too_many else ""))
    dataset, val_set, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device)
    # Rank r scores samples r, r + world_size, ...: each once (DistributedSampler would pad)
    val_share = Subset(val_set.dataset, val_set.indices[rank::world_size])
    val_data = DataLoader(val_share, batch_size=args.batch_size, pin_memory=device.type == "cuda")
    snapshot_path = args.snapshot_path or f"snapshot_06_{dtype}.pt"  # runs of each dtype apart
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every,
                      snapshot_path, args.log_file, DTYPES[dtype])
    trainer.train(args.max_epochs)
    del trainer  # DDP holds the group: drop it first, so that destroying it ends Gloo's threads
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 06: step 05 with mixed precision (AMP).")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="epochs per save (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples (default: 4096)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held out (default: 0.1)")
    parser.add_argument("--snapshot_path", help="default: snapshot_06_DTYPE.pt")
    parser.add_argument("--log_file", default=None, help="append a JSON line per epoch (for plots)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="of the forward pass (default: bf16 "
                        "where native, else fp16 on GPUs, fp32 on CPUs)")
    parser.add_argument("--cpu", action="store_true", help="the CPU and Gloo, even with GPUs")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process on the CPU (default: usable cores / processes)")
    parser.add_argument("--timeout_min", type=float, default=10, help="minutes before a hang fails")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards: argument checks, one line each. Not the lesson: read them last. ---------------------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")
    if "LOCAL_RANK" not in os.environ:  # started by plain python, not by torchrun
        parser.error(f"use torchrun: torchrun --standalone --nproc-per-node 2 {parser.prog}")
    return args


if __name__ == "__main__":
    main(parse_args())
