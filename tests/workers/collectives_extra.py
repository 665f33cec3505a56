"""Step 04 as torchrun starts it (its own main, unchanged), plus two checks run on the same ranks
after its last demo, before it tears the process group down:
* the hand-made ring all-reduce on float64 tensors of awkward lengths (not divisible by the world
  size, some shorter than it: empty chunks), and
* reduce_scatter's fallback (all_reduce, keep your piece), which Gloo of PyTorch 2.8 and later
  never needs, next to the native reduce_scatter.
Each rank saves its results to extra_<rank>.pt in the working directory.

    torchrun --standalone --nproc-per-node 3 tests/workers/collectives_extra.py [step 04's args]
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from faults import load_step  # noqa: E402  (the one loader of a step script)

SIZES = [1, 2, 5, 7, 1001, 12345]
step04 = load_step("04_collectives_intro.py")


def extra_checks():
    rank, n = dist.get_rank(), dist.get_world_size()
    results = {"ring": {}}
    for size in SIZES:  # seeded per size and rank: the test makes the same tensors
        x = torch.randn(size, generator=torch.Generator().manual_seed(size * 10 + rank),
                        dtype=torch.float64)
        results["ring"][size] = step04.ring_all_reduce_by_hand(x.clone())
    pieces = list(((rank + 1) * torch.arange(1.0, 2 * n + 1)).chunk(n))
    native = torch.zeros(2)
    dist.reduce_scatter(native, pieces)
    results["native"], results["fallback"] = native, step04.reduce_scatter_by_all_reduce(pieces)
    torch.save(results, f"extra_{rank}.pt")


destroy = dist.destroy_process_group


def checks_then_destroy(*args, **kwargs):
    extra_checks()
    destroy(*args, **kwargs)


dist.destroy_process_group = checks_then_destroy
step04.main(step04.parse_args(sys.argv[1:]))
