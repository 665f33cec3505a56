"""What a training step sends to the other ranks: every collective it starts, seen as it starts.

DDP's C++ reducer, FSDP, ZeroRedundancyOptimizer and our own code all start collectives through
the same PyTorch operators (c10d::allreduce_, c10d::_allgather_base_, ...). A TorchDispatchMode
sees every operator this thread dispatches, so it sees them all, whatever the strategy or the
backend.

Bytes are those each rank sends with ring algorithms (what NCCL does for large buffers), for N
ranks and a buffer of B bytes: all-reduce 2(N-1)/N x B, all-gather and reduce-scatter (N-1)/N x B
of the whole buffer, broadcast about (N-1)/N x B per rank (a pipelined ring). Gloo on the CPU may
move more (it runs a reduce-scatter as an all-reduce): this is what the strategy asks for.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# c10d operator -> (short name, bytes sent per rank as a multiple of the whole buffer, for N ranks)
COLLECTIVES = {
    "allreduce_": ("all_reduce", lambda n: 2 * (n - 1) / n),
    "allreduce_coalesced_": ("all_reduce", lambda n: 2 * (n - 1) / n),
    "_allgather_base_": ("all_gather", lambda n: (n - 1) / n),
    "allgather_": ("all_gather", lambda n: (n - 1) / n),
    "allgather_into_tensor_coalesced_": ("all_gather", lambda n: (n - 1) / n),
    "_reduce_scatter_base_": ("reduce_scatter", lambda n: (n - 1) / n),
    "reduce_scatter_": ("reduce_scatter", lambda n: (n - 1) / n),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", lambda n: (n - 1) / n),
    "broadcast_": ("broadcast", lambda n: (n - 1) / n),
}


class CollectiveCounter(TorchDispatchMode):
    """with CollectiveCounter(world_size) as seen: ...
    then seen.counts (a Counter of collective names) and seen.bytes_sent (per rank)."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.counts = Counter()
        self.bytes_sent = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func._opname in COLLECTIVES:
            name, factor = COLLECTIVES[func._opname]
            n = self.world_size
            given = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs))[0]
                        if isinstance(t, torch.Tensor))
            # An all-gather is given its output (the whole buffer) and this rank's piece, 1/N of
            # it; a reduce-scatter the same the other way round: the whole is N/(N+1) of the
            # bytes it is given.
            whole = given * n / (n + 1) if name in ("all_gather", "reduce_scatter") else given
            self.counts[name] += 1
            self.bytes_sent += factor(n) * whole
        return func(*args, **kwargs)

