"""Model FLOPs utilisation: the share of the hardware's peak arithmetic that training uses.

MFU = (training FLOPs per token x tokens per second) / peak FLOPs. The numerator counts
only the model's useful arithmetic (see GPT.flops_per_token), so MFU compares runs across
implementations, batch sizes and machines, which tokens/s alone cannot.
"""
import time

import torch

# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets, in FLOP/s per GPU.
# The first name that is part of torch.cuda.get_device_name() wins, so specific before general.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """What this process sustains on large square matmuls: the practical peak of a CPU
    (its data sheet peak depends on clock, vector units and cores we can't query portably)."""
    if device.type == "cuda":
        return measured_gpu_matmul_flops(device, dtype)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)  # warm-up: thread pool, kernels
    best, deadline, repeats = 0.0, time.perf_counter() + seconds, 0
    # The best of several: on a shared machine some repeats lose the CPU to other processes.
    while time.perf_counter() < deadline or repeats < 5:
        repeats += 1
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best


def measured_gpu_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, seconds: float = 0.3) -> float:
    """The same on a GPU, where one 1024^3 matmul timed from the host measures mostly the launch and the
    synchronisation: big matmuls queued back to back, timed by the GPU itself (CUDA events)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def time_matmuls(n: int) -> float:
        start.record()
        for _ in range(n):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000  # milliseconds -> seconds

    warm_up = time_matmuls(3)  # cuBLAS picks its kernel, the clocks ramp up; and how long one takes
    repeats = max(3, min(50, int(seconds / (warm_up / 3))))  # a slow GPU needs fewer for a steady figure
    return 2 * size ** 3 * repeats / time_matmuls(repeats)


def peak_flops(device: torch.device, dtype: torch.dtype, override=None):
    """(FLOP/s of one rank, where the figure comes from)."""
    if override:
        return float(override), "trainer.peak_flops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for model, flops in GPU_PEAK_FLOPS:
            if model in name:
                return flops, f"{model} data sheet"
    what = f"measured {str(dtype).removeprefix('torch.')} matmul"
    if device.type == "cpu":
        what += f", {torch.get_num_threads()} thread(s)"
    return measured_matmul_flops(device, dtype), what
