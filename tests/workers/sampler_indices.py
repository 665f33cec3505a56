"""Run under torchrun: every rank lists the sample indices its DistributedSampler yields (the
step-02 data loader, unchanged) for epochs 0 and 1, twice each; rank 0 writes them all as JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("step02", REPO / "02_multigpu_mp_spawn.py")
step02 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step02)

dataset_size, out_path = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
loader = step02.prepare_dataloader(step02.RegressionDataset(dataset_size), batch_size=8, device=torch.device("cpu"))
mine = {}
for epoch in (0, 1):
    loader.sampler.set_epoch(epoch)
    mine[epoch] = [list(loader.sampler), list(loader.sampler)]  # asked twice: must repeat itself
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, mine)
if dist.get_rank() == 0:
    Path(out_path).write_text(json.dumps(everyone))
dist.destroy_process_group()
