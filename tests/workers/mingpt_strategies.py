"""Train minGPT-ddp several times in one process group, each run as main.py trains
(main.snapshot_to_resume, main.build_trainer, Trainer.fit). Comparing strategies takes many short
runs, and starting torchrun for each costs seconds here. A run with the word `alone` among its
overrides trains in rank 0 alone, as one plain process without a process group does (the other
ranks wait).

    torchrun --standalone --nproc-per-node 2 tests/workers/mingpt_strategies.py OUT_DIR \
        ddp:trainer.strategy=ddp,trainer.grad_accum_steps=2  zero1:trainer.strategy=zero1 \
        ...  -- KEY=VALUE ...

A run is NAME:OVERRIDES (comma-separated, after the common ones after --). resume_from=OTHER@STEP
among them resumes from the snapshot run OTHER wrote at step STEP (every snapshot is kept as
OUT_DIR/NAME.pt.step<N>). Run NAME writes OUT_DIR/NAME.pt (its last snapshot), OUT_DIR/NAME.jsonl
(its log) and OUT_DIR/NAME.json:
  collectives  what optimizer step COUNTED_STEP sent (minGPT-ddp/traffic.py): counts, bytes per rank
  ranks        per rank: a hash of the weights it holds, the bytes of its AdamW state
  scale        the gradient scaler's scale at the end (float16)
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "minGPT-ddp"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # mingpt_faults
import bench  # noqa: E402
import config  # noqa: E402
import ddp_setup  # noqa: E402
import main  # noqa: E402
import traffic  # noqa: E402
import trainer  # noqa: E402
from char_dataset import CharData  # noqa: E402
from mingpt_faults import keep_snapshots  # noqa: E402

COUNTED_STEP = 2  # past the first step (which builds buckets, lazy state), not an evaluation


def count_collectives(seen: dict):
    train_step = trainer.Trainer.train_step

    def counted_train_step(self, it):
        if it != COUNTED_STEP:
            return train_step(self, it)
        with traffic.CollectiveCounter(self.rt.world_size) as counter:
            loss = train_step(self, it)
        seen.update(counts=dict(counter.counts), bytes_sent=counter.bytes_sent)
        return loss

    trainer.Trainer.train_step = counted_train_step


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def train(rt, out_dir: Path, name: str, overrides: list, common: list, seen: dict, corpora: dict):
    if "alone" in overrides:  # rank 0 as one plain process; the others wait for it
        if rt.is_main:
            alone = ddp_setup.Runtime(0, 0, 1, rt.device, None)
            rest = [o for o in overrides if o != "alone"]
            train(alone, out_dir, name, rest, common, seen, corpora)
        if rt.distributed:
            torch.distributed.barrier()
        return
    settings = [o for o in overrides if not o.startswith("resume_from=")]
    resume_from = [o.split("=", 1)[1] for o in overrides if o.startswith("resume_from=")]
    if resume_from and rt.is_main:  # the snapshot another run kept, where this run resumes it
        other, step = resume_from[0].split("@")
        shutil.copy(out_dir / f"{other}.pt.step{step}", out_dir / f"{name}.pt")
    cfg, _, _ = config.load([*common, *settings,
                             f"trainer.snapshot_path={out_dir / (name + '.pt')}",
                             f"trainer.log_file={out_dir / (name + '.jsonl')}",
                             *(["trainer.resume=true"] if resume_from else [])])
    key = (cfg.data.path, cfg.data.train_fraction, cfg.model.block_size)
    data = corpora[key] = corpora.get(key) or CharData(cfg.data, cfg.model.block_size)  # read once
    trainer.check_setup(cfg.trainer, rt)
    run = main.build_trainer(cfg, data, rt, main.snapshot_to_resume(cfg, data, rt))
    seen.clear()
    run.fit()
    # (under FSDP each rank holds its own shards: no hash to compare)
    mine = {"weights": None if run.fsdp else weights_hash(run.raw_model),
            "optimizer_bytes": bench.local_bytes(run.local_optimizer_state())}
    ranks = [json.loads(r) for r in ddp_setup.gather_strings(rt, json.dumps(mine))]
    if rt.is_main:
        (out_dir / f"{name}.json").write_text(json.dumps(
            {"collectives": dict(seen), "ranks": ranks, "scale": run.scaler.get_scale()}))
    rt.print(f"{name} finished at step {run.step} | val loss {run.last_val_loss:.6f}")


if __name__ == "__main__":
    separator = sys.argv.index("--")
    out_dir, runs, common = Path(sys.argv[1]), sys.argv[2:separator], sys.argv[separator + 1:]
    keep_snapshots()
    seen, corpora = {}, {}
    count_collectives(seen)
    rt = ddp_setup.start()
    try:
        for spec in runs:
            name, _, overrides = spec.partition(":")
            train(rt, out_dir, name, [o for o in overrides.split(",") if o], common, seen, corpora)
    finally:
        ddp_setup.stop(rt)
