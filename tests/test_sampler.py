"""DistributedSampler as the steps use it, observed on real ranks (torchrun + gloo).

Padding: when the data set does not divide by the world size, DistributedSampler (with
its default drop_last=False) repeats the first few indices of the shuffled order so that
every rank gets ceil(n / world_size) samples and the same number of batches. So: each
sample is seen exactly once per epoch when n divides evenly, and otherwise at least once,
with exactly world_size * ceil(n / world_size) - n samples seen twice.
"""
import json
import math
from collections import Counter

import pytest

from conftest import run, torchrun


def sampler_indices(tmp_path, world_size, dataset_size):
    out = tmp_path / "indices.json"
    run(torchrun(world_size, "tests/workers/sampler_indices.py", dataset_size, out), cwd=tmp_path)
    return json.loads(out.read_text())  # [rank][epoch as str][attempt] -> list of indices


@pytest.mark.parametrize("world_size,dataset_size", [(2, 64), (3, 64)])
def test_each_sample_once_per_epoch_and_set_epoch_reshuffles(tmp_path, world_size, dataset_size):
    ranks = sampler_indices(tmp_path, world_size, dataset_size)
    per_rank = math.ceil(dataset_size / world_size)
    padding = world_size * per_rank - dataset_size
    for epoch in ("0", "1"):
        seen = Counter()
        for rank in ranks:
            first, again = rank[epoch]
            assert first == again, "the same epoch must give the same order"
            assert len(first) == per_rank, "every rank gets the same number of samples"
            seen.update(first)
        assert set(seen) == set(range(dataset_size)), "every sample is seen in every epoch"
        assert sum(count - 1 for count in seen.values()) == padding
        if padding == 0:
            assert all(count == 1 for count in seen.values())
    for rank in ranks:
        assert rank["0"][0] != rank["1"][0], "set_epoch must change each rank's order"
    # and not only the order within a rank: which samples a rank gets changes too
    assert set(ranks[0]["0"][0]) != set(ranks[0]["1"][0])
