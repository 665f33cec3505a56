"""Train minGPT-ddp several times in one process group: one run per STRATEGY:ACCUM pair, each as main.py
trains (main.build_trainer, then Trainer.fit). Comparing strategies takes several short runs, and starting
torchrun for each costs seconds here.

    torchrun --standalone --nproc-per-node 2 tests/workers/mingpt_strategies.py OUT_DIR ddp:1 fsdp:1 ... \
        -- KEY=VALUE ...

Run STRATEGY:ACCUM writes OUT_DIR/STRATEGY_ACCUM.pt (its last snapshot) and OUT_DIR/STRATEGY_ACCUM.jsonl (its log).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "minGPT-ddp"))
import config  # noqa: E402
import ddp_setup  # noqa: E402
import main  # noqa: E402
from char_dataset import CharData  # noqa: E402

separator = sys.argv.index("--")
out_dir, runs, overrides = Path(sys.argv[1]), sys.argv[2:separator], sys.argv[separator + 1:]
rt = ddp_setup.start()
try:
    for run in runs:
        strategy, accum = run.split(":")
        name = f"{strategy}_{accum}"
        cfg, _, _ = config.load([*overrides, f"trainer.strategy={strategy}", f"trainer.grad_accum_steps={accum}",
                                 f"trainer.snapshot_path={out_dir / (name + '.pt')}",
                                 f"trainer.log_file={out_dir / (name + '.jsonl')}"])
        trainer = main.build_trainer(cfg, CharData(cfg.data, cfg.model.block_size), rt)
        trainer.fit()
        rt.print(f"{name} finished at step {trainer.step} | val loss {trainer.last_val_loss:.6f}")
finally:
    ddp_setup.stop(rt)
