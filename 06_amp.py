"""Step 06: automatic mixed precision (AMP): autocast and GradScaler.

Step 05 computed everything in float32. Most of a network's work (matrix multiplies) runs
much faster in 16-bit floats on hardware that has 16-bit units (GPU tensor cores, recent
CPUs with AMX or AVX512-BF16), and 16-bit activations take half the memory.

New over step 05:
  * `torch.autocast(device, dtype)`: inside it, matmuls and convolutions run in the low
    precision while precision-sensitive ops (losses, reductions, softmax) stay in float32.
    The weights, gradients and optimizer stay float32 ("mixed" precision).
  * `--dtype fp32|bf16|fp16`; default fp16 on a GPU, bf16 on the CPU. bfloat16 has float32's
    range, so gradients cannot overflow or vanish for range reasons: no scaler needed.
  * float16's range is small (max 65504, tiny gradients round to 0). `GradScaler` multiplies
    the loss by a large scale before backward() so small gradients survive, divides it out
    again (`unscale_`) before the optimizer uses them, and skips the step, halving the scale,
    when a gradient came out inf/NaN. Under DDP an overflow on one rank reaches every rank
    through the gradient all-reduce, so all ranks skip together and the copies stay equal.
    fp16 works on the CPU too (torch has a CPU GradScaler), but is rarely faster there.
  * Gradient clipping after `scaler.unscale_`: the threshold applies to the true gradients.
  * The scaler's state (its scale) goes into the snapshot, so a resumed run continues with it.
  * Time per epoch and the final loss are printed, to compare fp32 with the low precision.

    torchrun --standalone --nproc-per-node 2 06_amp.py --dtype fp32
    torchrun --standalone --nproc-per-node 2 06_amp.py --dtype bf16
    torchrun --standalone --nproc-per-node gpu 06_amp.py                # fp16 + GradScaler on GPUs
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

# Which communication library a device type uses: NCCL between NVIDIA GPUs
# (XCCL between Intel GPUs); Gloo between CPU processes.
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}
# How long a collective may wait for its peers: a dead peer becomes an error, not a hang.
TIMEOUT = timedelta(minutes=2)
# The precisions --dtype offers: fp32 turns autocast off.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def pick_device(local_rank: int, cpu: bool):
    """Process `local_rank` gets this node's GPU number `local_rank` and NCCL; without GPUs (or with --cpu)
    every process uses the CPU and Gloo."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if not cpu and accelerator is not None and accelerator.type in BACKENDS:
        gpus = torch.accelerator.device_count()
        if local_rank >= gpus:
            raise SystemExit(f"error: LOCAL_RANK {local_rank} has no GPU: this node has {gpus}; "
                             f"start at most {gpus} processes per node (--nproc-per-node {gpus})")
        return torch.device(accelerator.type, local_rank), BACKENDS[accelerator.type]
    return torch.device("cpu"), "gloo"


def usable_cores() -> int:
    """Cores this process may run on: fewer than the machine has under taskset, Slurm or a container."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ddp_setup(device: torch.device, backend: str):
    """torchrun has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for us."""
    if device.type == "cpu":
        # N processes sharing the CPU must not each start one thread per core. torchrun sets
        # OMP_NUM_THREADS=1 when it starts several; an OMP_NUM_THREADS you set yourself wins
        # (PyTorch reads it at start). Else: share this node's cores out evenly.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, usable_cores() // int(os.environ["LOCAL_WORLD_SIZE"])))
    else:
        torch.accelerator.set_device_index(device.index)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, store=attempt_store(rank), rank=rank, world_size=world_size, timeout=TIMEOUT)


def attempt_store(rank: int):
    """The key-value store where the processes exchange addresses, with keys kept apart per torchrun attempt.

    torchrun hosts one store for the whole job and keeps it when it restarts the processes,
    and init_process_group writes the same keys on every attempt. Restarted processes could
    then read the address a dead predecessor left there and try to connect to it (seen as
    "Connection refused" or a hang after a restart). A prefix naming the attempt
    (TORCHELASTIC_RESTART_COUNT) gives every attempt keys of its own.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=rank == 0 and not agent_hosts_store, timeout=TIMEOUT)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def save_atomically(obj, path: str):
    """Write to a temporary file, flush it to disk, then rename over `path`.

    A rename is atomic: whoever reads `path` sees the old file or the new one, never half of
    one, even if this process dies mid-write. The temporary name is unique per host and
    process, so nodes that share a file system never write into each other's file.
    """
    tmp_path = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    with open(tmp_path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def maybe_crash(epoch: int, rank: int):
    """Fault-tolerance demo: DDP_STEPS_CRASH_AT_EPOCH=E makes one rank (DDP_STEPS_CRASH_RANK, default the
    last) fail at the start of epoch E, on torchrun's first attempt only, so a restart can resume."""
    crash_epoch = os.environ.get("DDP_STEPS_CRASH_AT_EPOCH")
    crash_rank = int(os.environ.get("DDP_STEPS_CRASH_RANK", dist.get_world_size() - 1))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if crash_epoch is not None and int(crash_epoch) == epoch and rank == crash_rank and first_attempt:
        raise RuntimeError(f"simulated crash of rank {rank} at epoch {epoch} (DDP_STEPS_CRASH_AT_EPOCH)")


def inf_demo_step():
    """GradScaler demo: DDP_STEPS_INJECT_INF_AT_STEP=S turns one rank's loss (DDP_STEPS_INJECT_INF_RANK, default
    the last) into inf at optimizer step S of this run (counted from 0), so that its gradients overflow."""
    step = os.environ.get("DDP_STEPS_INJECT_INF_AT_STEP")
    return None if step is None else int(step)


def inf_demo_rank():
    return int(os.environ.get("DDP_STEPS_INJECT_INF_RANK", dist.get_world_size() - 1))


class Trainer:
    def __init__(self, model, train_data, val_data, optimizer, device, dtype_name, max_grad_norm, save_every,
                 snapshot_path, best_path, log_file):
        self.rank = int(os.environ["RANK"])  # unique over all nodes
        self.local_rank = int(os.environ["LOCAL_RANK"])  # unique on this node
        self.device = device
        self.tag = f"[{device.type}:{self.rank}]"  # every line says which process it comes from
        self.model = model.to(device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.dtype_name, self.dtype = dtype_name, DTYPES[dtype_name]
        self.max_grad_norm = max_grad_norm
        # Only float16 needs loss scaling; a disabled GradScaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.steps_run = 0  # optimizer steps in this run (for the inf-injection demo)
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.best_path = best_path
        self.log_file = log_file
        self.epochs_run = 0
        self.best_val_loss = float("inf")
        if os.path.exists(snapshot_path):
            self._load_snapshot(snapshot_path)
        # DDP keeps the copies in step: it averages gradients across processes during backward().
        # On the CPU there is no device to name: device_ids stays None (it lists GPUs).
        self.model = DDP(self.model, device_ids=None if device.type == "cpu" else [device.index])

    def _load_snapshot(self, snapshot_path):
        try:
            # weights_only=True: a snapshot holds tensors and numbers, never code to run.
            # map_location: put the tensors on this process's device, whichever saved them.
            snapshot = torch.load(snapshot_path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(snapshot["model"])
            self.optimizer.load_state_dict(snapshot["optimizer"])
            self.epochs_run = snapshot["epochs_run"]
            self.best_val_loss = snapshot["best_val_loss"]
            if snapshot["dtype"] != self.dtype_name:  # a SystemExit is no Exception: it passes the except below
                raise SystemExit(f"{self.tag} error: snapshot {snapshot_path} was trained with --dtype "
                                 f"{snapshot['dtype']}, this run has --dtype {self.dtype_name}; resume with "
                                 f"--dtype {snapshot['dtype']}, or pass another --snapshot_path")
            self.scaler.load_state_dict(snapshot["scaler"])  # the scale it had reached
        except Exception as e:  # any failure here means this file can't be resumed from
            reason = str(e).split(". ")[0].strip() or type(e).__name__  # its first sentence is enough
            raise SystemExit(f"{self.tag} error: cannot resume from snapshot {snapshot_path}: it is corrupt, "
                             f"truncated or from another model ({reason}); delete it to start afresh") from None
        print(f"{self.tag} Resuming training from snapshot {snapshot_path} at Epoch {self.epochs_run}")

    def autocast(self):
        """Low precision for the forward pass (and the loss) only; backward() follows the same choices."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _run_batch(self, source, targets):
        demo = inf_demo_step() == self.steps_run  # the GradScaler demo, see inf_demo_step()
        if demo:
            before = self._demo_state()
        self.optimizer.zero_grad()
        with self.autocast():
            output = self.model(source)
            loss = F.mse_loss(output, targets)  # autocast computes losses in float32
        scaled_loss = self.scaler.scale(loss)  # loss x scale, so small fp16 gradients do not round to zero
        if demo and self.rank == inf_demo_rank():
            scaled_loss = scaled_loss * float("inf")  # this rank's gradients overflow
        scaled_loss.backward()
        self.scaler.unscale_(self.optimizer)  # divide the scale out again: clipping must see true gradients
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)  # skips optimizer.step() if any gradient is inf or NaN
        self.scaler.update()  # lowers the scale after an overflow, raises it after many steps without one
        if demo:
            self._demo_report(*before)
        self.steps_run += 1
        return loss.detach()

    def _demo_state(self):
        weights = [p.detach().clone() for p in self.model.parameters()]
        return weights, self.scaler.get_scale() if self.scaler.is_enabled() else None

    def _demo_report(self, weights, scale):
        changed = any(not torch.equal(w, p) for w, p in zip(weights, self.model.parameters()))
        new_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.rank == 0:
            print(f"{self.tag} Step {self.steps_run} | inf injected into rank {inf_demo_rank()}'s loss | "
                  f"weights changed: {changed} | scale {scale} -> {new_scale}"
                  + (" | GradScaler skipped the step on this rank" if not changed else ""))

    @torch.no_grad()
    def _validate(self):
        """Mean squared error over the WHOLE validation set, whatever the number of ranks.

        Each rank scores its own share of the validation samples; one all_reduce adds up the squared
        errors and the sample counts of all ranks. Dividing the two totals weights every sample once,
        even when the shares differ in size (a plain mean of per-rank means would not).
        """
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of squared errors, samples]
        for source, targets in self.val_data:
            source, targets = source.to(self.device), targets.to(self.device)
            with self.autocast():  # evaluation gets the same speed-up
                output = self.model.module(source)  # no gradients, nothing for DDP to synchronize
                totals[0] += F.mse_loss(output, targets, reduction="sum").double()
            totals[1] += targets.numel()
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        self.model.train()
        return (totals[0] / totals[1]).item()

    def _run_epoch(self, epoch):
        maybe_crash(epoch, self.rank)
        start = time.perf_counter()
        batch_size = self.train_data.batch_size
        self.train_data.sampler.set_epoch(epoch)  # without it, every epoch would see the same split and order
        total_loss = torch.zeros((), device=self.device)
        for source, targets in self.train_data:
            source, targets = source.to(self.device), targets.to(self.device)
            total_loss += self._run_batch(source, targets)
        steps = len(self.train_data)
        # Every rank ran `steps` batches (DistributedSampler evens them out): average over all ranks.
        dist.all_reduce(total_loss, op=dist.ReduceOp.SUM)
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
        snapshot = {
            "model": self.model.module.state_dict(),  # .module: the model inside the DDP wrapper
            "optimizer": self.optimizer.state_dict(),  # momentum buffers: needed to resume exactly
            "epochs_run": epoch + 1,
            "best_val_loss": self.best_val_loss,  # so a resumed run only keeps a model better than this
            "scaler": self.scaler.state_dict(),  # the scale reached (empty when the scaler is off)
            "dtype": self.dtype_name,
        }
        save_atomically(snapshot, self.snapshot_path)
        print(f"{self.tag} Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def _save_best(self, epoch, val_loss):
        # The model alone (like step 01's checkpoint): what you would deploy or evaluate later.
        save_atomically(self.model.module.state_dict(), self.best_path)
        print(f"{self.tag} Epoch {epoch} | New best val_loss:{val_loss:.4f}, model saved at {self.best_path}")

    def train(self, max_epochs: int):
        if self.epochs_run >= max_epochs and self.rank == 0:
            print(f"{self.tag} Nothing to train: the snapshot has {self.epochs_run} epochs, --max_epochs is "
                  f"{max_epochs}")
        records = []
        for epoch in range(self.epochs_run, max_epochs):
            record = self._run_epoch(epoch)
            records.append(record)
            # Every rank has the same val_loss (all_reduce), so every rank takes the same decision here.
            record["best"] = record["val_loss"] < self.best_val_loss
            if record["best"]:
                self.best_val_loss = record["val_loss"]
                if self.local_rank == 0:
                    self._save_best(epoch, record["val_loss"])
            if self.rank == 0 and self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # All copies are identical, so one process per node saving is enough; each node then has
            # a snapshot on its own disk to resume from, even without a shared file system.
            if self.local_rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
        if self.rank == 0:
            print(f"{self.tag} Finished training: {max_epochs} epochs | dtype {self.dtype_name} | "
                  + summarize(records) + f" | best val_loss:{self.best_val_loss:.4f} saved at {self.best_path}")


def summarize(records):
    """Final losses and the mean time per epoch, leaving out the first epoch (warm-up) when there are more."""
    if not records:
        return "no epochs run"
    timed = records[1:] or records
    mean = sum(r["epoch_time_s"] for r in timed) / len(timed)
    return (f"final train_loss:{records[-1]['train_loss']:.4f} val_loss:{records[-1]['val_loss']:.4f} | "
            f"mean epoch time {mean:.3f} s" + (" (first epoch not counted)" if len(records) > 1 else ""))


def load_train_objs(args):
    train_set, val_set = split_dataset(RegressionDataset(args.dataset_size), args.val_fraction)
    model = torch.nn.Sequential(  # a small dense network: 20 -> 64 -> 1
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return train_set, val_set, model, optimizer


def split_dataset(dataset: Dataset, val_fraction: float):
    """Train/validation split from a generator with a fixed seed of its own: every rank computes exactly
    the same split, whatever its rank, the training seed or the global random state."""
    val_size = max(1, round(len(dataset) * val_fraction))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(4321)).tolist()
    return Subset(dataset, order[val_size:]), Subset(dataset, order[:val_size])


def check_same_split(val_set: Subset, device: torch.device):
    """Compare every rank's validation indices (by two checksums) with rank 0's; stop if any differs."""
    idx = torch.tensor(val_set.indices, dtype=torch.int64)
    mine = torch.stack([idx.sum(), (idx * torch.arange(1, len(idx) + 1)).sum(), torch.tensor(len(idx))])
    everyone = [torch.zeros_like(mine, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine.to(device))
    differ = [r for r, other in enumerate(everyone) if not torch.equal(other, everyone[0])]
    if differ:
        raise SystemExit(f"error: ranks {differ} have another train/validation split than rank 0")


def prepare_dataloader(dataset: Dataset, batch_size: int, seed: int):
    # pinned host memory speeds up copies to a GPU; it means nothing without one.
    # DistributedSampler gives each process a disjoint 1/world_size of the samples (it shuffles,
    # so the DataLoader must not). If the data set does not divide evenly, it repeats a few
    # samples so that every process gets the same number of batches.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=torch.cuda.is_available(),
                      sampler=DistributedSampler(dataset, seed=seed))


def prepare_val_dataloader(val_set: Subset, batch_size: int):
    # Rank r scores samples r, r + world_size, r + 2 * world_size, ...: every sample exactly once over all
    # ranks, nothing repeated (DistributedSampler would pad to equal shares and count a few twice).
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share = Subset(val_set.dataset, val_set.indices[rank::world_size])
    return DataLoader(share, batch_size=batch_size, shuffle=False, pin_memory=torch.cuda.is_available())


def share_sizes(samples: int, world_size: int) -> str:
    fewest, most = samples // world_size, -(-samples // world_size)
    return str(fewest) if fewest == most else f"{fewest}-{most}"


def describe_cpu_use(world_size: int, device: torch.device, tag: str):
    """Say how many processes and threads share this node's cores; warn when they are more than the cores."""
    if device.type != "cpu":
        return
    processes, threads, cores = int(os.environ["LOCAL_WORLD_SIZE"]), torch.get_num_threads(), usable_cores()
    print(f"{tag} this node: {processes} processes x {threads} thread(s) on {cores} usable core(s)")
    if processes * threads > cores:
        print(f"{tag} note: oversubscribed ({processes * threads} threads > {cores} cores): the processes take "
              f"turns on the cores. Training is still correct, only slower; for speed use at most {cores} "
              f"processes x threads per node")


def pick_dtype(name, device: torch.device) -> str:
    """--dtype, or by default fp16 on a GPU (the fastest there, with GradScaler) and bf16 on the CPU."""
    if name is None:
        name = "bf16" if device.type == "cpu" else "fp16"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: this GPU has no bfloat16 support (it needs compute capability 8.0, Ampere, "
                         "or newer); use --dtype fp16 or --dtype fp32")
    return name


def main(args):
    # One write per printed line, so lines from several processes never mix mid-line.
    sys.stdout.reconfigure(line_buffering=True, write_through=False)
    device, backend = pick_device(int(os.environ["LOCAL_RANK"]), args.cpu)
    dtype_name = pick_dtype(args.dtype, device)
    dtype = DTYPES[dtype_name]
    # One snapshot and best model per precision, so fp32 and bf16 runs side by side never resume each other.
    snapshot_path = args.snapshot_path or f"snapshot_06_{dtype_name}.pt"
    best_path = args.best_path or f"best_06_{dtype_name}.pt"
    ddp_setup(device, backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same initial weights on every run (DDP also copies rank 0's to all)
    tag = f"[{device.type}:{rank}]"
    if rank == 0:
        print(f"{tag} device {device.type} | backend {backend} | world_size {world_size} | "
              f"threads per process {torch.get_num_threads()}")
        print(f"{tag} precision: " + ("fp32, autocast off" if dtype == torch.float32 else
                                      f"autocast {str(dtype).removeprefix('torch.')} | GradScaler "
                                      f"{'on' if dtype == torch.float16 else 'off (not needed)'}"))
    if int(os.environ["LOCAL_RANK"]) == 0:  # one report per node: each node has its own cores
        describe_cpu_use(world_size, device, tag)
    dataset, val_set, model, optimizer = load_train_objs(args)
    check_same_split(val_set, device)
    if rank == 0:
        print(f"{tag} data: {len(dataset)} train | {len(val_set)} validation samples, the same split on all "
              f"{world_size} ranks (checked); each rank validates {share_sizes(len(val_set), world_size)} of them")
    train_data = prepare_dataloader(dataset, args.batch_size, args.seed)
    val_data = prepare_val_dataloader(val_set, args.batch_size)
    trainer = Trainer(model, train_data, val_data, optimizer, device, dtype_name, args.max_grad_norm,
                      args.save_every, snapshot_path, best_path, args.log_file)
    trainer.train(args.max_epochs)
    # Wait for every rank before tearing down. While a rank waits here, Gloo's threads finish with its
    # last collective; a thread still holding one of our tensors when Python shuts down aborts the
    # process ("terminate called without an active exception", a PyTorch bug: pytorch/pytorch#179291).
    dist.barrier()
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Step 06: step 05 with automatic mixed precision (autocast, GradScaler) and gradient "
                    "clipping.",
        epilog="Start it with torchrun, e.g.: torchrun --standalone --nproc-per-node 2 06_amp.py --dtype bf16")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per batch (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="save a snapshot every N epochs (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and data order")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples in the data set (default: 4096)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of the data held out for validation (default: 0.1)")
    parser.add_argument("--snapshot_path", default=None,
                        help="snapshot to save, and to resume from if it exists (default: snapshot_06_DTYPE.pt)")
    parser.add_argument("--best_path", default=None,
                        help="the model with the lowest validation loss so far (default: best_06_DTYPE.pt)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="precision of the forward pass: fp32 (autocast off), bf16, or fp16 (with "
                             "GradScaler) (default: fp16 on a GPU, bf16 on the CPU)")
    parser.add_argument("--max_grad_norm", type=float, default=5.0,
                        help="clip the gradients' total norm to this (default: 5.0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU with Gloo even if there are GPUs")
    parser.add_argument("--log_file", default=None, help="append one JSON line per epoch here (for plots)")
    args = parser.parse_args(argv)
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.max_grad_norm <= 0:
        parser.error("--max_grad_norm must be positive")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1 (exclusive)")
    if round(args.dataset_size * (1 - args.val_fraction)) < 1:
        parser.error("--dataset_size is too small to leave any training samples after the validation split")
    return args


if __name__ == "__main__":
    args = parse_args()
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: start this script with torchrun, e.g. "
                         "torchrun --standalone --nproc-per-node 2 06_amp.py")
    main(args)
