"""DistributedSampler, as the README describes it (step 02), checked in this process: no process
group is needed to ask a sampler for rank r of N its share (num_replicas, rank).

With its default drop_last=False, a data set that does not divide by the world size is padded:
the first few indices of the shuffled order come again, so that every rank gets
ceil(n / world_size) samples and the same number of batches. Each sample is seen once per
epoch when n divides evenly, otherwise at least once, with exactly
world_size * ceil(n / world_size) - n samples seen twice; set_epoch reshuffles. (That the steps
use the sampler so, set_epoch included, is what test_ddp_equivalence.py and the step 03, 05
and 06 tests check: a step that skips set_epoch ends elsewhere.)
"""
import math
from collections import Counter

import pytest
from torch.utils.data.distributed import DistributedSampler


@pytest.mark.parametrize("world_size,dataset_size", [(2, 64), (3, 64), (8, 410)])
def test_each_sample_once_per_epoch_and_set_epoch_reshuffles(world_size, dataset_size):
    samplers = [DistributedSampler(range(dataset_size), num_replicas=world_size, rank=r)
                for r in range(world_size)]
    per_rank = math.ceil(dataset_size / world_size)
    orders = {}
    for epoch in (0, 1):
        seen = Counter()
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            first, again = list(sampler), list(sampler)
            assert first == again, "the same epoch must give the same order"
            assert len(first) == per_rank, "every rank gets the same number of samples"
            seen.update(first)
            orders[epoch, rank] = first
        assert set(seen) == set(range(dataset_size)), "every sample is seen in every epoch"
        assert sum(count - 1 for count in seen.values()) == world_size * per_rank - dataset_size
    for rank in range(world_size):
        assert orders[0, rank] != orders[1, rank], "set_epoch must change each rank's order"
    # and not only the order within a rank: which samples a rank gets changes too
    assert set(orders[0, 0]) != set(orders[1, 0])
