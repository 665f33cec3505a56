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
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "tools"))
import plan  # noqa: E402



class Simulation:
    def __init__(self, root):
        self.root = root
        self.folders = {}  # (folder, its commands in order) -> their runs

    def runs(self, name: str, what: str) -> list:
        steps = plan.plan(plan.machine.EXAMPLES[name], what, on_cpu=True)
        folders = {}
        for step in steps:
            folders.setdefault(step.folder, []).append(step)
        new = {(folder, tuple(s.argv for s in group)): group for folder, group in folders.items()}
        new = {key: group for key, group in new.items() if key not in self.folders}
        # Two folders at a time: their commands are independent, and one often waits (a process
        # starting, a rendezvous, a checkpoint) while the other computes.
        with ThreadPoolExecutor(max_workers=2) as pool:
            started = {key: pool.submit(self.run_folder, len(self.folders) + i, group)
                       for i, (key, group) in enumerate(new.items())}
            self.folders.update({key: future.result() for key, future in started.items()})
        done = {}
        for folder, group in folders.items():
            done.update(zip(group, self.folders[(folder, tuple(s.argv for s in group))]))
        # the run of an identical command, judged by what this machine's plan expects from it
        return [dataclasses.replace(done[step], step=step) for step in steps]

    def run_folder(self, number: int, steps: list) -> list:
        root = self.root / f"{number:02d}"
        return [plan.execute(step, root, self.env()) for step in steps]

    @staticmethod
    def env() -> dict:
        # MASTER_PORT: mp.spawn's rank 0 listens there (steps 02, 04): a free one, as elsewhere.
        # OMP_NUM_THREADS=1: a single process would spin a thread per core, taking the other
        # folder's core (the multi-process steps use one thread each anyway). torch.compile keeps
        # its kernels in its own cache (/tmp/torchinductor_USER), between sessions and clones:
        # compiling minGPT for the CPU takes minutes the first time, seconds after.
        return {**os.environ, **plan.CPU_SWITCH, "MASTER_PORT": str(free_port()),
                "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> Simulation:
    return Simulation(tmp_path_factory.mktemp("machines"))
