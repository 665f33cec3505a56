"""DDP on N processes must train exactly like one process that sees the union of their batches.

The N-process run is the real step-02 script (mp.spawn + gloo). The reference is a plain
loop in this test process: at every step it concatenates the batches the N ranks got
from their DistributedSamplers and takes one SGD step on that union. DDP averages the
ranks' gradients, which for equal-sized batches is the gradient of the union's mean loss.
"""
import argparse
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from conftest import REPO, load_script, run

STEP02 = "02_multigpu_mp_spawn.py"


def single_process_on_union(step, args, world_size):
    torch.manual_seed(args.seed)  # the script seeds the same way before building the model
    dataset, model, optimizer = step.load_train_objs(args)
    samplers = [DistributedSampler(dataset, num_replicas=world_size, rank=r)
                for r in range(world_size)]
    steps = 0
    for epoch in range(args.max_epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in samplers]
        for start in range(0, len(per_rank[0]), args.batch_size):
            union = [i for indices in per_rank for i in indices[start:start + args.batch_size]]
            inputs, targets = dataset[union]
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()
            optimizer.step()
            steps += 1
    return model.state_dict(), steps


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_matches_one_process_on_union_of_batches(tmp_path, world_size):
    # 200 samples: 3 ranks get 67 each (one padded sample), batches of 16 -> the last batch is 3 on every rank
    cli = ["--max_epochs", "2", "--batch_size", "16", "--dataset_size", "200", "--lr", "0.05", "--seed", "3"]
    ckpt = tmp_path / "checkpoint.pt"
    proc = run([sys.executable, REPO / STEP02, "--world_size", world_size,
                "--checkpoint_path", ckpt, *cli], cwd=tmp_path)
    assert f"world_size {world_size}" in proc.stdout

    step = load_script(STEP02)
    args = argparse.Namespace(max_epochs=2, batch_size=16, dataset_size=200, lr=0.05, seed=3)
    expected, steps = single_process_on_union(step, args, world_size)
    per_rank = math.ceil(200 / world_size)
    assert steps == 2 * math.ceil(per_rank / 16)  # k optimizer steps: epochs x batches per rank

    ddp_weights = torch.load(ckpt, weights_only=True)
    assert ddp_weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_the_comparison_can_tell_runs_apart():
    """The check above can fail: one process taking steps of 16 samples (not the union of 2x16) ends elsewhere."""
    step = load_script(STEP02)
    args = argparse.Namespace(max_epochs=2, batch_size=16, dataset_size=200, lr=0.05, seed=3)
    union_of_two, _ = single_process_on_union(step, args, world_size=2)
    plain_single, _ = single_process_on_union(step, args, world_size=1)
    assert any(not torch.allclose(union_of_two[k], plain_single[k], atol=1e-4) for k in union_of_two)
