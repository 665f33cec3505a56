"""The fixture `simulated`: every command that the tour and gpu-check would run on the example
machines (tools/plan.py, minGPT-ddp/machine.py's EXAMPLES), run on this CPU once per session.

    runs = simulated.runs("8xh100", "gpu-check")   # [plan.Run], one per step, in the plan's order
    plan.judge(runs[0])                             # "ok", or what went wrong

Each command runs as planned for that machine (arguments, folder, processes per node), with CUDA
hidden (plan.CPU_SWITCH, as `tools/gpu_check.py --on-cpu`) and minGPT-ddp's model shrunk
(plan.SIM_MODEL).
A folder whose commands are the same on two machines (the 2-process steps of a laptop, a Mac and a
one-GPU notebook) runs once: its runs serve both, each judged against what its own plan expects.
"""
import dataclasses
import os
import sys

import pytest

from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "tools"))
import plan  # noqa: E402

# torch.compile's kernels, kept between sessions: compiling minGPT for a CPU takes minutes at first.
INDUCTOR_CACHE = REPO / "runs" / "inductor-cache"


class Simulation:
    def __init__(self, root):
        self.root = root
        self.folders = {}  # (folder, its commands in order) -> their runs

    def runs(self, name: str, what: str) -> list:
        steps = plan.plan(plan.machine.EXAMPLES[name], what, on_cpu=True)
        folders = {}
        for step in steps:
            folders.setdefault(step.folder, []).append(step)
        done = {}
        for folder, group in folders.items():
            key = (folder, tuple(step.argv for step in group))
            if key not in self.folders:
                root = self.root / f"{len(self.folders):02d}"
                self.folders[key] = [plan.execute(step, root, self.env()) for step in group]
            done.update(zip(group, self.folders[key]))
        # the run of an identical command, judged by what this machine's plan expects from it
        return [dataclasses.replace(done[step], step=step) for step in steps]

    @staticmethod
    def env() -> dict:
        # MASTER_PORT: mp.spawn's rank 0 listens there (steps 02, 04): a free one, as elsewhere.
        return {**os.environ, **plan.CPU_SWITCH, "MASTER_PORT": str(free_port()),
                "TORCHINDUCTOR_CACHE_DIR": str(INDUCTOR_CACHE)}


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> Simulation:
    return Simulation(tmp_path_factory.mktemp("machines"))
