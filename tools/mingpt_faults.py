"""Run minGPT-ddp/main.py with a fault injected from outside: the trainer has no hooks for it.

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tools/mingpt_faults.py \
        --crash-at-step 15 --keep-snapshots trainer.strategy=fsdp trainer.resume=auto ...

--crash-at-step K   once per run, the last rank raises as optimizer step K begins (and leaves the file
                    SNAPSHOT.crashed, so that no later attempt crashes again); torchrun restarts every
                    rank, which resume from the snapshot
--keep-snapshots    rank 0 also copies every snapshot it writes to PATH.step<N>, to resume from an earlier
                    point later (under another strategy, say)
Every other argument goes to main.py.
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "minGPT-ddp"))
import main  # noqa: E402
import trainer  # noqa: E402  (main's Trainer is this module's class: patching it patches the run)


def crash_at_step(crash_step: int):
    train_step = trainer.Trainer.train_step

    def crashing_train_step(self, it):
        # Not TORCHELASTIC_RESTART_COUNT: on several nodes torchrun counts a restart only on the node whose
        # process failed, and after a restart the last rank may live on the other node.
        marker = Path(f"{self.tcfg.snapshot_path}.crashed")
        if it == crash_step and self.rt.rank == self.rt.world_size - 1 and not marker.exists():
            marker.touch()
            raise RuntimeError(f"simulated crash of rank {self.rt.rank} at step {it} (tools/mingpt_faults.py)")
        return train_step(self, it)

    trainer.Trainer.train_step = crashing_train_step


def keep_snapshots():
    save_snapshot = trainer.Trainer.save_snapshot

    def save_and_copy(self):
        save_snapshot(self)
        if self.rt.is_main:
            shutil.copy(self.tcfg.snapshot_path, f"{self.tcfg.snapshot_path}.step{self.step}")

    trainer.Trainer.save_snapshot = save_and_copy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-at-step", type=int, default=None)
    parser.add_argument("--keep-snapshots", action="store_true")
    args, main_args = parser.parse_known_args()
    if args.crash_at_step is not None:
        crash_at_step(args.crash_at_step)
    if args.keep_snapshots:
        keep_snapshots()
    main.main(main_args)
