"""Train a character-level GPT with DistributedDataParallel: one process, or N under torchrun.
trainer.strategy=handmade averages the gradients with the hand-written DDP of handmade.py;
zero1 shards the AdamW state over the N processes, fsdp the whole model (FSDP2).

Without data.path the model trains on Python's own standard library sources (offline, on
any machine). Snapshots go to trainer.snapshot_path; continue a run with trainer.resume=true
(or auto: resume if the snapshot exists). Metrics: JSON lines in trainer.log_file.
"""
import sys
from dataclasses import asdict
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

import config
import ddp_setup
import snapshot
from char_dataset import CharData
from model import GPT
from trainer import Trainer, check_setup, config_error, resolve_dtype

USAGE = """usage:
  python minGPT-ddp/main.py [config=FILE.yaml] [section.key=value ...]
  torchrun --standalone --nproc-per-node N minGPT-ddp/main.py [config=FILE.yaml] [section.key=value ...]

  config=FILE   the yaml to start from; default: minGPT-ddp/gpt2_train_cfg.yaml where there
                is a GPU, minGPT-ddp/cpu_cfg.yaml otherwise. A relative data.path in a yaml
                file is relative to that file; on the command line, to the current directory.
  key=value     overrides, e.g. trainer.max_iters=200 model.n_layer=4 data.path=input.txt
  -h, --help    this help
"""


def snapshot_to_resume(cfg, data: CharData, rt: ddp_setup.Runtime) -> Optional[dict]:
    """The snapshot every rank resumes from, or None for a fresh start; or one error on every rank.

    One resume point for all: rank 0 alone reads the snapshot (and later sends its tensors to the
    others). On several nodes each node may see its own file at trainer.snapshot_path (no shared
    file system, or an old copy left behind): every node reports what it sees, and if two differ,
    or rank 0 sees nothing where another node has a snapshot, every rank stops with one line.
    """
    tcfg = cfg.trainer
    if tcfg.resume.lower() == "false":
        return None
    seen = ddp_setup.gather_strings(rt, snapshot.describe(tcfg.snapshot_path) if rt.local_rank == 0 else "")
    reports = {rank: what for rank, what in enumerate(seen) if rank == 0 or what}  # one per node
    found = {rank: what for rank, what in reports.items() if what != "none"}
    if len(set(found.values())) > 1 or (found and 0 not in found):
        views = "; ".join(f"rank {rank}: {what}" for rank, what in reports.items())
        raise SystemExit(f"{rt.tag} error: the nodes see different snapshots at {tcfg.snapshot_path} ({views}); "
                         "every rank must resume from the same one: put trainer.snapshot_path on a file "
                         "system all nodes share, or copy the newest snapshot to every node")
    if not found and tcfg.resume.lower() == "auto":
        return None

    problem, state = None, None
    if rt.is_main:
        try:
            state = snapshot.load(tcfg.snapshot_path)
            problem = mismatch(cfg, data, state, rt.device)
        except SystemExit as e:  # not found, unreadable, not a snapshot
            problem = str(e).removeprefix("error: ")
    if rt.distributed:  # rank 0's verdict, and the small part of the state, for everyone
        small = None if state is None else {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        shared = [problem, small]
        dist.broadcast_object_list(shared, src=0)
        problem, state = shared[0], state if rt.is_main else shared[1]
    if problem:
        raise config_error(problem)
    return state


def mismatch(cfg, data: CharData, state: dict, device: torch.device) -> Optional[str]:
    """Why this run cannot continue from the snapshot `state`, or None."""
    path = cfg.trainer.snapshot_path
    saved_model = state["config"].get("model", {})
    differences = [f"model.{k}={saved_model.get(k)} (now {v})" for k, v in asdict(cfg.model).items()
                   if saved_model.get(k) != v]
    if differences:
        return (f"snapshot {path} holds another model: {', '.join(differences)}; "
                "use its settings or start afresh (trainer.resume=false)")
    if state["vocab"] != data.vocab.chars:
        return f"snapshot {path} was trained on other data (another vocabulary) than {data.source}"
    saved_dtype = state["config"].get("trainer", {}).get("dtype")
    if resolve_dtype(cfg.trainer.dtype, device) == torch.float16 and not state["scaler"]:
        # A float16 run needs the gradient scaler's state (its scale), which a float32/bfloat16 run never had.
        return (f"trainer.dtype=float16 cannot resume snapshot {path}: it was trained with trainer.dtype="
                f"{saved_dtype}, without a gradient scaler; resume with trainer.dtype=float32 or bfloat16, "
                "or start afresh (trainer.resume=false)")
    return None


def main(args: list):
    if any(arg in ("-h", "--help") for arg in args):
        defaults, path, _ = config.load([])
        print(USAGE)
        print(__doc__)
        print(f"Config keys and their values in {path.name} (the default here):\n")
        print(config.as_yaml(defaults))
        return
    # What can be wrong with the input fails here, on every rank alike, before any process waits
    # for another; what needs the others (the world size, the snapshot rank 0 reads) right after.
    cfg, config_path, overrides = config.load(args)
    data = CharData(cfg.data, cfg.model.block_size)

    rt = ddp_setup.start(timeout=timedelta(minutes=cfg.trainer.timeout_minutes))
    try:
        check_setup(cfg.trainer, rt)  # settings this world size or this machine cannot run
        backend = rt.backend or "none (one process)"
        threads = f" | {torch.get_num_threads()} thread(s) per rank" if rt.device.type == "cpu" else ""
        rt.print(f"device {rt.device.type} | backend {backend} | world_size {rt.world_size} | "
                 f"GPUs here {ddp_setup.gpus_here()}{threads} | "
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

        resume_state = snapshot_to_resume(cfg, data, rt)
        trainer = build_trainer(cfg, data, rt, resume_state)
        tcfg, mcfg = cfg.trainer, cfg.model
        rt.print(f"model {trainer.raw_model.num_params() / 1e6:.2f}M parameters | {mcfg.n_layer} layers, "
                 f"{mcfg.n_head} heads, {mcfg.n_embd} embd, block {mcfg.block_size}, dropout {mcfg.dropout} | "
                 f"strategy {strategy_name(tcfg)} | "
                 f"dtype {str(trainer.dtype).removeprefix('torch.')} | "
                 f"compile {'on' if tcfg.compile else 'off'}")
        rt.print(f"global batch {tcfg.batch_size} seqs x {mcfg.block_size} tokens x "
                 f"{trainer.accum_steps} "
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
        trainer = None  # the model holds the process group: let go of it first (ddp_setup.stop)
        ddp_setup.stop(rt)


def strategy_name(tcfg) -> str:
    if tcfg.strategy == "fsdp":
        return ("fsdp (ZeRO-3)" if tcfg.reshard_after_forward
                else "fsdp (ZeRO-2: reshard_after_forward false)")
    return tcfg.strategy


def build_trainer(cfg, data: CharData, rt: ddp_setup.Runtime, resume_state: Optional[dict] = None) -> Trainer:
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    return Trainer(cfg, GPT(cfg.model, len(data.vocab)), data, rt, resume_from=resume_state)


if __name__ == "__main__":
    main(sys.argv[1:])
