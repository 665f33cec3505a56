"""Train a character-level GPT with DistributedDataParallel: one process, or N under torchrun.

Without data.path the model trains on Python's own standard library sources (offline, on
any machine). Snapshots go to trainer.snapshot_path; continue a run with trainer.resume=true
(or auto: resume if the snapshot exists). Metrics: JSON lines in trainer.log_file.
"""
import os
import sys
from dataclasses import asdict

import torch

import config
import ddp_setup
import snapshot
from char_dataset import CharData
from model import GPT
from trainer import Trainer, resolve_dtype

USAGE = """usage:
  python minGPT-ddp/main.py [config=FILE.yaml] [section.key=value ...]
  torchrun --standalone --nproc-per-node N minGPT-ddp/main.py [config=FILE.yaml] [section.key=value ...]

  config=FILE   the yaml to start from; default: minGPT-ddp/gpt2_train_cfg.yaml where there
                is a GPU, minGPT-ddp/cpu_cfg.yaml otherwise. A relative data.path in a yaml
                file is relative to that file; on the command line, to the current directory.
  key=value     overrides, e.g. trainer.max_iters=200 model.n_layer=4 data.path=input.txt
  -h, --help    this help
"""


def snapshot_to_resume(cfg, data: CharData):
    """The snapshot to resume from, checked against this run's model and data, or None."""
    tcfg = cfg.trainer
    mode = tcfg.resume.lower()
    if mode == "false" or (mode == "auto" and not os.path.exists(tcfg.snapshot_path)):
        return None
    state = snapshot.load(tcfg.snapshot_path)
    saved_model = state["config"].get("model", {})
    differences = [f"model.{k}={saved_model.get(k)} (now {v})" for k, v in asdict(cfg.model).items()
                   if saved_model.get(k) != v]
    if differences:
        raise SystemExit(f"error: snapshot {tcfg.snapshot_path} holds another model: {', '.join(differences)}; "
                         "use its settings or start afresh (trainer.resume=false)")
    if state["vocab"] != data.vocab.chars:
        raise SystemExit(f"error: snapshot {tcfg.snapshot_path} was trained on other data (another vocabulary) "
                         f"than {data.source}")
    return state


def main(args: list):
    if any(arg in ("-h", "--help") for arg in args):
        defaults, path, _ = config.load([])
        print(USAGE)
        print(__doc__)
        print(f"Config keys and their values in {path.name} (the default here):\n")
        print(config.as_yaml(defaults))
        return
    # Everything that can be wrong with the input fails here, on every rank alike,
    # before any process waits for another.
    cfg, config_path, overrides = config.load(args)
    data = CharData(cfg.data, cfg.model.block_size)
    resume_state = snapshot_to_resume(cfg, data)

    rt = ddp_setup.start()
    try:
        backend = rt.backend or "none (one process)"
        threads = f" | {torch.get_num_threads()} thread(s) per rank" if rt.device.type == "cpu" else ""
        rt.print(f"device {rt.device.type} | backend {backend} | world_size {rt.world_size}{threads} | "
                 f"torch {torch.__version__}")
        rt.print(f"config {config_path}" + (f" | overrides {' '.join(overrides)}" if overrides else ""))
        # Every rank built vocabulary and split on its own: check they agree before training on them.
        fingerprint = data.fingerprint()
        rt.print(f"data {data.source} | vocab {len(data.vocab)} | train {len(data.train):,} / "
                 f"val {len(data.val):,} chars | fingerprint {fingerprint}", every_rank=True)
        fingerprints = ddp_setup.gather_strings(rt, fingerprint)
        if len(set(fingerprints)) > 1:
            raise SystemExit(f"{rt.tag} error: ranks disagree on the data (fingerprints {fingerprints}); "
                             "make data.path the same file on every node")

        torch.manual_seed(cfg.trainer.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        model = GPT(cfg.model, len(data.vocab))
        trainer = Trainer(cfg, model, data, rt, resume_from=resume_state)
        tcfg, mcfg = cfg.trainer, cfg.model
        rt.print(f"model {model.num_params() / 1e6:.2f}M parameters | {mcfg.n_layer} layers, {mcfg.n_head} heads, "
                 f"{mcfg.n_embd} embd, block {mcfg.block_size}, dropout {mcfg.dropout} | "
                 f"dtype {str(resolve_dtype(tcfg.dtype, rt.device)).removeprefix('torch.')} | "
                 f"compile {'on' if tcfg.compile else 'off'}")
        rt.print(f"global batch {tcfg.batch_size} seqs x {mcfg.block_size} tokens x {tcfg.grad_accum_steps} "
                 f"micro-steps x {rt.world_size} ranks = {trainer.tokens_per_step:,} tokens/step | "
                 f"lr {trainer.max_lr:.2e} (x{trainer.lr_scale:.3g}, lr_scaling {tcfg.lr_scaling}) | "
                 f"AdamW {trainer.optimizer_kind} | MFU peak {trainer.peak_flops / 1e9:,.0f} GFLOP/s per rank "
                 f"({trainer.peak_source})")
        if resume_state is not None:
            rt.print(f"resuming from {tcfg.snapshot_path} at step {trainer.step}")
        first_step = trainer.step
        trainer.fit()
        saved = f" | snapshot {tcfg.snapshot_path}" if tcfg.snapshot_path else ""
        rt.print(f"Finished training: steps {first_step}-{trainer.step} | val loss {trainer.last_val_loss:.4f} | "
                 f"{trainer.elapsed_s:.1f} s{saved}")
    finally:
        ddp_setup.stop(rt)


if __name__ == "__main__":
    main(sys.argv[1:])
