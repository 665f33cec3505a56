"""Make step 03 die in the middle of writing a snapshot, as a power cut or a kill -9 would.

torch.save is replaced by a version that writes half of the real bytes and then ends the
process on the spot (os._exit: no cleanup, no exception handlers). Everything else is the
real script, run as a one-process group (RANK/WORLD_SIZE/... set by the test)."""
import importlib.util
import io
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("step03", REPO / "03_multigpu_torchrun.py")
step03 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step03)

real_save = torch.save


def save_half_then_die(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os._exit(17)


torch.save = save_half_then_die
step03.main(step03.parse_args(sys.argv[1:]))
