"""Step 06: automatic mixed precision (AMP) on top of step 05: 16-bit matmuls, float32 where it matters.

New over step 05: `torch.autocast` runs matmuls in bf16 or fp16 (fast on tensor cores and AMX CPUs), losses
and reductions in float32; weights, gradients and optimizer stay float32. `--dtype` picks fp32, bf16 (float32's
range: no scaler; the default where native) or fp16, whose small range needs `GradScaler`: it scales the loss up
so tiny gradients survive, divides it out (`unscale_`) before clipping, and skips steps whose gradients overflowed
(on all ranks: they share the all-reduced gradients). Its state goes into the snapshot; epochs are timed.

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

# The communication library between processes: NCCL for NVIDIA GPUs, XCCL for Intel GPUs, else Gloo (CPU).
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}
# Cores this process may run on: fewer than the machine has under taskset, Slurm or a container.
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype; fp32: autocast off


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


def pick_device(gpu_index: int, processes_per_node: int, cpu: bool = False):
    """GPU number `gpu_index` and NCCL if this node has a GPU for every process; else all use the CPU and Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    gpus = torch.accelerator.device_count() if accelerator is not None and accelerator.type in BACKENDS else 0
    if cpu or gpus < processes_per_node:
        return torch.device("cpu"), "gloo"
    return torch.device(accelerator.type, gpu_index), BACKENDS[accelerator.type]


def ddp_setup(device: torch.device, backend: str, timeout: timedelta):
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)  # each process drives its own GPU
    elif "OMP_NUM_THREADS" not in os.environ:  # yours wins (PyTorch reads it at start); else share the cores out
        torch.set_num_threads(max(1, USABLE_CORES // int(os.environ["LOCAL_WORLD_SIZE"])))
    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; why not plain env:// here: see the file's end
    store, rank, world_size = store_for_this_attempt(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class Trainer:
    def __init__(self, model, train_data, val_data, optimizer, rank, device, dtype_name, save_every, snapshot_path,
                 best_path, log_file):
        self.rank = rank
        self.device = device
        self.tag = f"[{device.type}:{rank}]"  # every line says which process it comes from
        # DDP keeps the copies in step: it averages gradients across processes during backward().
        self.model = DDP(model.to(device), device_ids=None if device.type == "cpu" else [device.index])
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.dtype_name, self.dtype = dtype_name, DTYPES[dtype_name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)  # off: passes through
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.best_path = best_path
        self.log_file = log_file
        self.epochs_run = 0
        self.best_val_loss = float("inf")
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
        self.best_val_loss = snapshot[0]["best_val_loss"]
        self.scaler.load_state_dict(snapshot[0]["scaler"])  # the scale it had reached
        print(f"{self.tag} Resuming training from snapshot {self.snapshot_path} at Epoch {self.epochs_run}")

    def autocast(self):  # low precision for the forward pass and the loss; backward() follows the same choices
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        with self.autocast():
            output = self.model(source)
            loss = F.mse_loss(output, targets)  # autocast computes losses in float32
        self.scaler.scale(loss).backward()  # loss x scale, so small fp16 gradients do not round to zero
        self.scaler.unscale_(self.optimizer)  # divide the scale out again: clipping must see true gradients
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=5.0)  # a rare huge step cannot wreck it
        self.scaler.step(self.optimizer)  # skips optimizer.step() if any gradient is inf or NaN
        self.scaler.update()  # lowers the scale after an overflow, raises it after many steps without one
        return loss.detach()

    @torch.no_grad()
    def _validate(self):
        """Mean squared error over the WHOLE validation set, every sample counted once whatever the world size."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of squared errors, samples]
        for source, targets in self.val_data:
            source, targets = source.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with self.autocast():  # evaluation gets the same speed-up
                output = self.model.module(source)  # no gradients, nothing for DDP to synchronize
                totals[0] += F.mse_loss(output, targets, reduction="sum").double()
            totals[1] += targets.numel()
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)  # each rank scored its own share: add up all ranks' sums
        self.model.train()
        return (totals[0] / totals[1]).item()

    def _run_epoch(self, epoch):
        start = time.perf_counter()
        batch_size = self.train_data.batch_size
        self.train_data.sampler.set_epoch(epoch)  # without it, every epoch would see the same split and order
        total_loss = torch.zeros((), device=self.device)
        for source, targets in self.train_data:
            # non_blocking: from pinned memory, the copy to a GPU overlaps with work already queued
            source, targets = source.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            total_loss += self._run_batch(source, targets)
        steps = len(self.train_data)
        dist.all_reduce(total_loss, op=dist.ReduceOp.SUM)  # every rank ran `steps` batches: average over all
        train_loss = total_loss.item() / (steps * dist.get_world_size())  # one device->host copy per epoch
        val_loss = self._validate()
        seconds = time.perf_counter() - start  # .item() above waited for the device: the time is real
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == 0:
            print(f"{self.tag} Epoch {epoch} | Batchsize {batch_size} | Steps {steps} | "
                  f"train_loss:{train_loss:.4f} val_loss:{val_loss:.4f} | {seconds:.3f} s"
                  + (f" | scale {scale:g}" if scale is not None else ""))
        return {"epoch": epoch, "batch_size": batch_size, "steps": steps, "loss": train_loss,
                "train_loss": train_loss, "val_loss": val_loss, "world_size": dist.get_world_size(),
                "dtype": self.dtype_name, "scale": scale, "epoch_time_s": seconds}

    def _save_snapshot(self, epoch):
        snapshot = {"model": self.model.module.state_dict(),  # .module: the model inside the DDP wrapper
                    "optimizer": self.optimizer.state_dict(),  # momentum buffers: needed to resume exactly
                    "epochs_run": epoch + 1,
                    "best_val_loss": self.best_val_loss,  # so a resumed run only keeps a better model
                    "scaler": self.scaler.state_dict()}  # the scale reached (empty when the scaler is off)
        # Write to a temporary file, then rename: a crash mid-write never leaves a half file behind.
        tmp_path = f"{self.snapshot_path}.tmp.{os.getpid()}"
        torch.save(snapshot, tmp_path)
        os.replace(tmp_path, self.snapshot_path)
        print(f"{self.tag} Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def _save_best(self, epoch, val_loss):
        tmp_path = f"{self.best_path}.tmp.{os.getpid()}"  # atomically, as the snapshot
        torch.save(self.model.module.state_dict(), tmp_path)  # the model alone, as step 01's checkpoint
        os.replace(tmp_path, self.best_path)
        print(f"{self.tag} Epoch {epoch} | New best val_loss:{val_loss:.4f}, model saved at {self.best_path}")

    def train(self, max_epochs: int):
        for epoch in range(self.epochs_run, max_epochs):
            record = self._run_epoch(epoch)
            record["best"] = record["val_loss"] < self.best_val_loss  # the same on every rank (all_reduce)
            if record["best"]:
                self.best_val_loss = record["val_loss"]
                if self.rank == 0:
                    self._save_best(epoch, record["val_loss"])
            if self.rank == 0 and self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # All copies are identical, so one process saving is enough.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
        if self.rank == 0:
            print(f"{self.tag} Finished training: {max_epochs} epochs | dtype {self.dtype_name} | "
                  f"best val_loss:{self.best_val_loss:.4f} saved at {self.best_path}")


def load_train_objs(args):
    # A train/validation split from a generator with a fixed seed of its own: every rank makes the same one.
    dataset = RegressionDataset(args.dataset_size)
    val_size = max(1, round(len(dataset) * args.val_fraction))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(4321)).tolist()
    train_set, val_set = Subset(dataset, order[val_size:]), Subset(dataset, order[:val_size])
    model = torch.nn.Sequential(  # a small dense network: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return train_set, val_set, model, optimizer


def prepare_dataloader(dataset: Dataset, batch_size: int, device: torch.device, seed: int):
    # pinned (page-locked) host memory speeds up copies to a CUDA GPU; it means nothing for the CPU
    # DistributedSampler: each process gets its own shuffled 1/world_size of the samples; the DataLoader mustn't shuffle
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda",
                      sampler=DistributedSampler(dataset, seed=seed))


def pick_dtype(name, device: torch.device) -> str:  # --dtype, or bf16 where it is native (CPU, Ampere+), else fp16
    native_bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported(False))
    if name == "bf16" and not native_bf16:  # emulated bf16 (V100, T4) works, but slower than fp32
        raise SystemExit("error: this GPU has no native bfloat16 (Ampere or newer has); use --dtype fp16 or fp32")
    return name or ("bf16" if native_bf16 else "fp16")


def main(args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    device, backend = pick_device(int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]), args.cpu)
    dtype_name = pick_dtype(args.dtype, device)
    snapshot_path = args.snapshot_path or f"snapshot_06_{dtype_name}.pt"  # one per precision: they never mix
    best_path = args.best_path or f"best_06_{dtype_name}.pt"
    ddp_setup(device, backend, timedelta(minutes=args.timeout_min))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same initial weights and data order on every run
    print(f"[{device.type}:{rank}] device {device.type} | backend {backend} | world_size {world_size} | "
          f"GPUs here {torch.accelerator.device_count()}")
    if rank == 0:
        scaler = "on" if dtype_name == "fp16" else "off (not needed)"
        print(f"[{device.type}:0] precision: " + ("fp32, autocast off" if dtype_name == "fp32" else
                                                  f"autocast {str(DTYPES[dtype_name])[6:]} | GradScaler {scaler}"))
    if device.type == "cpu" and int(os.environ["LOCAL_RANK"]) == 0:  # one report per node: it has its own cores
        processes, threads, cores = int(os.environ["LOCAL_WORLD_SIZE"]), torch.get_num_threads(), USABLE_CORES
        print(f"[cpu:{rank}] this node: {processes} processes x {threads} thread(s) on {cores} usable core(s)"
              + (" | oversubscribed: still correct, only slower" if processes * threads > cores else ""))
    dataset, val_set, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device, args.seed)
    # Rank r validates samples r, r + world_size, ...: each once (DistributedSampler would pad, counting some twice)
    val_share = Subset(val_set.dataset, val_set.indices[rank::world_size])
    val_data = DataLoader(val_share, batch_size=args.batch_size, pin_memory=device.type == "cuda")
    trainer = Trainer(model, train_data, val_data, optimizer, rank, device, dtype_name, args.save_every,
                      snapshot_path, best_path, args.log_file)
    trainer.train(args.max_epochs)
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 06: step 05 with automatic mixed precision.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="save a snapshot every N epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and data order")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share held out for validation (default: 0.1)")
    parser.add_argument("--snapshot_path", default=None, help="saved here; resumed from if it exists")
    parser.add_argument("--best_path", default=None, help="the model with the lowest validation loss")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="precision of the forward pass: fp32 "
                        "(autocast off), bf16, or fp16 with GradScaler (default: bf16 where native, else fp16)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU with Gloo even if there are GPUs")
    parser.add_argument("--log_file", default=None, help="append one JSON line per epoch here (for plots)")
    parser.add_argument("--timeout_min", type=float, default=10, help="minutes to wait for a slow or dead rank")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards and conveniences: clear one-line errors for bad input. Not the lesson; read them last. ----------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1 (exclusive)")
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
        raise SystemExit("error: use torchrun: torchrun --standalone --nproc-per-node 2 06_amp.py")
    main(args)
