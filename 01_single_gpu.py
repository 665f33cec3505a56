"""Step 01: train a small model on one device.

The baseline every later step extends: one process, one device (a GPU if there is one, else
the CPU), a toy regression task and a small Trainer class. No distributed code yet.

    python 01_single_gpu.py --max_epochs 20 --lr 0.02   # default: 10 epochs, lr 0.01
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from plumbing import RegressionDataset  # the toy data set: y = w·x + noise


def pick_device() -> torch.device:
    """A GPU (or other accelerator) if PyTorch sees one, else the CPU."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, 0)


class Trainer:
    def __init__(self, model, train_data, optimizer, device, save_every, checkpoint_path,
                 log_file):
        self.device = device
        self.tag = f"[{device}]"  # every line says where it comes from
        self.model = model.to(device)
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
                "world_size": 1}

    def _save_checkpoint(self, epoch):
        # To a temporary file, then renamed: a crash mid-write never leaves a half file behind.
        tmp_path = f"{self.checkpoint_path}.tmp.{os.getpid()}"
        torch.save(self.model.state_dict(), tmp_path)
        os.replace(tmp_path, self.checkpoint_path)
        print(f"{self.tag} Epoch {epoch} | Training checkpoint saved at {self.checkpoint_path}")

    def train(self, max_epochs: int):
        for epoch in range(max_epochs):
            start = time.perf_counter()
            record = self._run_epoch(epoch)
            record["epoch_time_s"] = time.perf_counter() - start
            if self.log_file:
                with open(self.log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs:
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
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      pin_memory=device.type == "cuda")


def main(args):
    sys.stdout.reconfigure(line_buffering=True, write_through=False)  # one write per whole line
    torch.manual_seed(args.seed)  # the same initial weights on every run
    device = pick_device()
    print(f"[{device}] device {device.type} | backend none"
          f" | world_size 1 | GPUs here {torch.accelerator.device_count()}")
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size, device)
    trainer = Trainer(model, train_data, optimizer, device, args.save_every,
                      args.checkpoint_path, args.log_file)
    trainer.train(args.max_epochs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 01: train a toy model on one device.")
    parser.add_argument("--max_epochs", type=int, default=10, help="epochs to train (default: 10)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--save_every", type=int, default=5, help="epochs per save (default: 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--dataset_size", type=int, default=4096, help="samples (default: 4096)")
    parser.add_argument("--checkpoint_path", default="checkpoint.pt", help="where to save")
    parser.add_argument("--log_file", default=None, help="append a JSON line per epoch (for plots)")
    return check_args(parser, parser.parse_args(argv))


# ---- Guards: argument checks, one line each. Not the lesson: read them last. ---------------------
def check_args(parser, args):
    for name in ("max_epochs", "batch_size", "save_every", "dataset_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


if __name__ == "__main__":
    main(parse_args())
