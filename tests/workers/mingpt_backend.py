"""Run minGPT-ddp/main.py with one node's backend choice replaced from outside, as a node with fewer
GPUs than processes (Gloo among NCCL nodes) or one with GPUs (NCCL among Gloo nodes) would pick:

    torchrun --nnodes 2 ... tests/workers/mingpt_backend.py --on-node 1 --pick nccl [main.py args]

The node whose torchrun node rank (GROUP_RANK) is --on-node picks the CPU with the backend --pick;
the others pick as usual. (Not --node: torchrun would take it for its --node-rank, abbreviated.)
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "minGPT-ddp"))
import ddp_setup  # noqa: E402
import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--on-node", type=int, required=True)
    parser.add_argument("--pick", required=True)
    args, main_args = parser.parse_known_args()
    if int(os.environ["GROUP_RANK"]) == args.on_node:
        ddp_setup.pick_device = lambda local_rank, processes: (torch.device("cpu"), args.pick)
    main.main(main_args)
