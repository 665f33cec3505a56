"""What a machine has, as far as choosing a device, a precision and a config goes.

One description (Machine) and the rules that read it. Machine.here() describes this
machine; a Machine written by hand asks what another one would do: the tour, gpu-check
and the tests plan for a T4, an A100, 8 H100s or a Mac this way, with the same rules
that minGPT-ddp applies when it starts.
"""
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

# The communication library between processes of a device type: NCCL between NVIDIA GPUs,
# XCCL between Intel GPUs. Everything else (the CPU, and Apple's MPS, which has none) uses Gloo.
BACKENDS = {"cuda": "nccl", "xpu": "xccl"}


@dataclass(frozen=True)
class Machine:
    accelerator: Optional[str] = None  # "cuda", "xpu", "mps", or None for a CPU-only machine
    gpus: int = 0  # accelerator devices this process can see
    gpu_name: str = ""  # e.g. "Tesla T4", "NVIDIA H100 80GB HBM3"
    gpu_bf16: bool = False  # the GPU computes in bfloat16 natively (NVIDIA Ampere and newer)
    cpu_bf16: bool = False  # the CPU has bfloat16 instructions (AVX512-BF16 or AMX)
    cores: int = 1  # CPU cores this process may run on

    @classmethod
    def here(cls) -> "Machine":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        kind = accelerator.type if accelerator is not None else None
        gpus = torch.accelerator.device_count() if kind is not None else 0
        # including_emulation=False: a V100 or T4 "supports" bf16 only by emulating it, slowly.
        gpu_bf16 = ((kind == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))
                    or kind == "xpu")
        return cls(accelerator=kind, gpus=gpus,
                   gpu_name=torch.cuda.get_device_name(0) if kind == "cuda" else (kind or ""),
                   gpu_bf16=gpu_bf16, cpu_bf16=cpu_has_bf16(), cores=usable_cores())

    @property
    def gpus_with_backend(self) -> int:
        """GPUs that several processes can use together (0 for MPS, which has no backend)."""
        return self.gpus if self.accelerator in BACKENDS else 0

    def describe(self) -> str:
        if self.accelerator is None:
            return f"no GPU, {self.cores} CPU cores"
        if self.accelerator == "mps":
            return f"Apple GPU (MPS: no backend between processes), {self.cores} CPU cores"
        bf16 = "native bf16" if self.gpu_bf16 else "no native bf16"
        return f"{self.gpus} x {self.gpu_name} ({bf16}), {self.cores} CPU cores"

    def without_gpus(self) -> "Machine":
        """This machine with its GPUs hidden (CUDA_VISIBLE_DEVICES=): what a GPU machine's run
        forced onto the CPU sees."""
        return replace(self, accelerator=None, gpus=0, gpu_name="", gpu_bf16=False)


# Machines a workshop meets, described by hand. tools/plan.py plans the tour and gpu-check for
# each, the tests run every command of those plans on a CPU, and `tools/gpu_check.py --on-cpu
# --machine NAME` does the same by hand (docs/MACHINES.md).
EXAMPLES = {
    "cpu": Machine(cores=8),  # a laptop without a GPU (Linux, Windows, an Intel Mac)
    "mps": Machine("mps", 1, "mps", cores=8),  # an Apple-silicon Mac
    "t4": Machine("cuda", 1, "Tesla T4", gpu_bf16=False, cores=2),  # a hosted notebook (Colab)
    "a100": Machine("cuda", 1, "NVIDIA A100-SXM4-40GB", gpu_bf16=True, cores=12),  # a cloud GPU
    "2xt4": Machine("cuda", 2, "Tesla T4", gpu_bf16=False, cores=4),  # Kaggle's "GPU T4 x2"
    "8xh100": Machine("cuda", 8, "NVIDIA H100 80GB HBM3", gpu_bf16=True, cpu_bf16=True, cores=192),
}


def cpu_has_bf16() -> bool:
    """bfloat16 instructions on this CPU; without them bf16 autocast converts back and forth,
    slower than float32 (so nanoGPT keeps the CPU in float32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which taskset, Slurm or a container may
    narrow and os.cpu_count() ignores (macOS and Windows have no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def uses_gpus(machine: Machine, processes_per_node: int) -> bool:
    """The device rule of every step and of minGPT-ddp: GPUs only with one for every process on
    the node; else every process uses the CPU and Gloo (2 processes on a one-GPU notebook)."""
    return machine.gpus_with_backend >= processes_per_node


def device_type(machine: Machine, processes_per_node: int) -> str:
    return machine.accelerator if uses_gpus(machine, processes_per_node) else "cpu"


def backend(machine: Machine, processes_per_node: int) -> str:
    return BACKENDS.get(device_type(machine, processes_per_node), "gloo")


def amp_dtype(machine: Machine, on_gpu: bool) -> torch.dtype:
    """The fastest precision that trains as well as float32: bfloat16 where it is native,
    else float16 (with a GradScaler) on a GPU, else float32 on a CPU."""
    if on_gpu:
        return torch.bfloat16 if machine.gpu_bf16 else torch.float16
    return torch.bfloat16 if machine.cpu_bf16 else torch.float32


def mingpt_config(machine: Machine, processes_per_node: int) -> str:
    """minGPT-ddp's default config: the 25M-parameter GPT only where the processes get GPUs;
    on CPU processes (a laptop, a Mac, 2 processes on one GPU) a small one that trains in a
    minute."""
    return "gpt2_train_cfg.yaml" if uses_gpus(machine, processes_per_node) else "cpu_cfg.yaml"
