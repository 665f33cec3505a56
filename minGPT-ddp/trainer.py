"""The training loop: data-parallel over ranks, with everything a real run needs:
gradient accumulation, mixed precision, warmup + cosine learning rate, gradient clipping,
evaluation averaged over ranks, logs (text, JSONL, progress bar) and snapshots to resume from.

Four strategies (trainer.strategy), from the most memory per rank to the least:
  ddp       torch's DistributedDataParallel: a whole copy of the model, its gradients and the AdamW
            state on every rank; gradients averaged by all-reduce during backward();
  handmade  the same, written out in handmade.py (hooks, buckets, async all-reduce) to read;
  zero1     DDP with the AdamW state sharded (ZeroRedundancyOptimizer, ZeRO stage 1): each rank
            steps 1/N of the weights and sends them to the others;
  fsdp      PyTorch's FSDP2 (`fully_shard`): weights, gradients and AdamW state 1/N per rank, a
            block's weights gathered only while it computes (ZeRO-3; ZeRO-2 with
            trainer.reshard_after_forward=false: kept whole from forward until backward).
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function
from tqdm import tqdm

import ddp_setup
import handmade
import machine
import mfu
import snapshot
from char_dataset import CharData
from model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCALINGS = ("none", "sqrt", "linear")
RESUME_CHOICES = ("false", "true", "auto")
STRATEGIES = ("ddp", "handmade", "zero1", "fsdp")
COMM_HOOKS = {"none": None, "fp16": default_hooks.fp16_compress_hook,
              "bf16": default_hooks.bf16_compress_hook}


@dataclass
class TrainerConfig:
    max_iters: int = 5000  # optimizer steps; the same however many ranks run (see README)
    batch_size: int = 64  # sequences per rank per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step, of each rank (see below)
    # true: grad_accum_steps counts the micro-batches of all ranks together, each of N ranks runs
    # 1/N of them: a step sees the same tokens on any number of ranks (as nanoGPT's train_gpt2).
    fixed_global_batch: bool = False
    learning_rate: float = 6e-4
    min_lr: Optional[float] = None  # where the cosine ends; None: learning_rate / 10
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # where the cosine ends; None: max_iters
    lr_scaling: str = "none"  # none | sqrt | linear in world_size / lr_base_world_size
    lr_base_world_size: int = 1  # the world size learning_rate was tuned for
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    eval_interval: int = 250  # evaluate (and snapshot) every N steps; 0: only at the end
    eval_iters: int = 20  # validation batches per evaluation, shared out among the ranks
    log_interval: int = 10
    snapshot_path: Optional[str] = "runs/mingpt/snapshot.pt"  # None: no snapshots
    resume: str = "false"  # false: start afresh | true: from snapshot_path | auto: if it exists
    log_file: Optional[str] = "runs/mingpt/metrics.jsonl"  # one JSON record per log/eval point
    dtype: str = "auto"  # auto: machine.amp_dtype | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    peak_flops: Optional[float] = None  # FLOP/s of one device for MFU; None: data sheet or measured
    strategy: str = "ddp"  # ddp | handmade | zero1 | fsdp: see this file's docstring
    reshard_after_forward: bool = True  # fsdp: true ZeRO-3, false ZeRO-2 (whole until backward)
    # DDP's levers (ddp, zero1; bucket_cap_mb also handmade), measured in the README's "Making DDP
    # fast".
    bucket_cap_mb: float = 25.0  # gradients per all-reduce: each starts once its bucket is full
    gradient_as_bucket_view: bool = True  # .grad lives in DDP's buckets: no copy in or out
    static_graph: bool = False  # true: DDP may assume every step uses the same parameters
    comm_hook: str = "none"  # none | fp16 | bf16: send gradients compressed (changes the result)
    timeout_minutes: float = 10.0  # how long a collective waits for the other ranks before it fails
    deterministic: bool = False  # true: deterministic kernels: a resumed GPU run ends bit-identical


def config_error(message: str) -> SystemExit:
    """A setting this run cannot use: one line (rank 0 says it; every rank checks alike), exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


def check_setup(cfg: TrainerConfig, rt: ddp_setup.Runtime):
    """What is wrong with this world size or this machine. Every rank decides alike, and stops at once."""
    if cfg.strategy in ("zero1", "fsdp") and not rt.distributed:
        raise config_error(f"trainer.strategy={cfg.strategy} shards over processes: start it with "
                           "torchrun (torchrun --standalone --nproc-per-node 2 minGPT-ddp/main.py "
                           "...)")
    if cfg.fixed_global_batch and cfg.grad_accum_steps % rt.world_size:
        raise config_error(f"trainer.fixed_global_batch=true shares trainer.grad_accum_steps="
                           f"{cfg.grad_accum_steps} micro-batches among the ranks: {rt.world_size} "
                           "ranks cannot share them evenly; make trainer.grad_accum_steps a "
                           f"multiple of {rt.world_size} (and trainer.batch_size smaller, for the "
                           "same global batch)")
    if (cfg.static_graph and rt.distributed and cfg.strategy in ("ddp", "zero1")
            and micro_steps_per_rank(cfg, rt.world_size) > 1):
        raise config_error("trainer.static_graph=true cannot accumulate gradients: DDP stops with "
                           "an internal assert in backward under no_sync() "
                           "(pytorch/pytorch#143580); use trainer.static_graph=false, or 1 "
                           "micro-step per rank")
    if cfg.comm_hook == "bf16" and rt.backend not in ("nccl", "xccl"):
        raise config_error(f"trainer.comm_hook=bf16 needs NCCL or XCCL (PyTorch's "
                           f"bf16_compress_hook), not {rt.backend or 'one process'}; use "
                           "trainer.comm_hook=fp16")
    if cfg.strategy == "fsdp" and cfg.eval_iters % rt.world_size:
        # Every forward gathers weights from all ranks, so all ranks must run the same number of them.
        raise config_error(f"trainer.strategy=fsdp needs the same number of validation batches on every rank: "
                           f"trainer.eval_iters={cfg.eval_iters} is not a multiple of the world size {rt.world_size}")
    if cfg.compile:
        problem = compile_problem(rt.device.type)
        if problem:
            raise config_error(f"trainer.compile=true cannot work here: {problem}; use trainer.compile=false")


def compile_problem(device_type: str) -> Optional[str]:
    """Why torch.compile cannot run on this setup, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"PyTorch {torch.__version__} cannot compile on Python {sys.version.split()[0]} on {sys.platform}"
    if device_type == "cpu":  # the CPU backend compiles C++; GPUs use Triton instead
        compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler) is None:
            return f"compiling for the CPU needs a C++ compiler and {compiler} (or $CXX) was not found"
    return None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bfloat16 where it is native, else float16 on a GPU, float32 on a CPU
        return machine.amp_dtype(machine.Machine.here(), on_gpu=device.type != "cpu")
    return DTYPES[name]


def use_deterministic_kernels():
    """Same inputs, same bits: a run killed and resumed on GPUs can then end bit-identical to one
    never stopped. Many GPU kernels (some cuBLAS matmuls, atomic-add reductions, attention backward)
    may add in another order from one call to the next; PyTorch then picks deterministic ones, a
    little slower, or raises where there is none. cuBLAS needs a fixed workspace for it, set before
    its first matmul. (On the CPU, and between ranks, the sums are already in a fixed order.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def micro_steps_per_rank(cfg: TrainerConfig, world_size: int) -> int:
    return cfg.grad_accum_steps // world_size if cfg.fixed_global_batch else cfg.grad_accum_steps


def shard(model: GPT, rt: ddp_setup.Runtime, dtype: torch.dtype,
          reshard_after_forward: bool) -> GPT:
    """FSDP2: each block, then the rest (embeddings, final norm, head), becomes one unit whose weights
    are split in N pieces, one per rank. A unit's forward and backward all-gather its weights first and
    free them after; its gradients are reduce-scattered, so each rank keeps (and steps) 1/N of them.
    Mixed precision: compute with bf16/fp16 copies of the weights, keep and reduce in float32.
    reshard_after_forward=False keeps each block's gathered weights from its forward until its
    backward (ZeRO-2: one gather per block instead of two, whole weights held meanwhile)."""
    low_precision = dtype if dtype != torch.float32 else None
    policy = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
    mesh = ddp_setup.device_mesh(rt)  # the shards go to this rank's device
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    # In place: model is now an FSDP module. Its own unit (embeddings, final norm, head) keeps its
    # weights from forward until backward either way: FSDP's default for the root, whose weights
    # backward needs first.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def make_optimizer(model: GPT, cfg: TrainerConfig, lr: float):
    groups = model.optimizer_param_groups(cfg.weight_decay)
    for fused in (True, False):
        # fused: one kernel updates every parameter (CUDA, and CPU since PyTorch 2.4)
        settings = dict(lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
        try:
            if cfg.strategy == "zero1":
                # Each rank keeps the AdamW state of, and steps, about 1/N of the parameters, then
                # broadcasts them (parameters_as_bucket_view: one broadcast per rank, not one per
                # tensor).
                return (ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                                parameters_as_bucket_view=True, **settings),
                        "fused, sharded" if fused else "foreach, sharded")
            return torch.optim.AdamW(groups, **settings), "fused" if fused else "foreach"
        except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not cover
            if not fused:
                raise


def wrap_ddp(model: torch.nn.Module, rt: ddp_setup.Runtime, cfg: TrainerConfig) -> DDP:
    """torch's DDP with the levers of the config (README, "Making DDP fast")."""
    ddp_model = DDP(model, device_ids=[rt.device.index] if rt.device.type != "cpu" else None,
                    bucket_cap_mb=cfg.bucket_cap_mb, static_graph=cfg.static_graph,
                    gradient_as_bucket_view=cfg.gradient_as_bucket_view)
    if COMM_HOOKS[cfg.comm_hook] is not None:  # each bucket cast to 16 bits, all-reduced, cast back
        ddp_model.register_comm_hook(None, COMM_HOOKS[cfg.comm_hook])
    return ddp_model


def parameter_names(model: GPT, param_groups: list) -> list:
    """The names of the parameters in param_groups, in the order optimizers number them."""
    name_of = {p: name for name, p in model.named_parameters()}
    return [name_of[p] for group in param_groups for p in group["params"]]


def zero1_state_by_name(model: GPT, zero: ZeroRedundancyOptimizer) -> dict:
    """The consolidated state (rank 0, after consolidate_state_dict) as the snapshots hold AdamW's
    state under every strategy: under the parameters' names, as torch.distributed.checkpoint writes
    it for DDP and FSDP."""
    state = zero.state_dict()  # PyTorch's format: parameters numbered in the order of param_groups
    names = parameter_names(model, zero.param_groups)
    return {"state": {names[i]: value for i, value in state["state"].items()},
            # zero's own groups name only the settings it was given: AdamW's defaults complete them
            "param_groups": [{**zero.optim.defaults, **group,
                              "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def zero1_state_by_index(model: GPT, zero: ZeroRedundancyOptimizer, by_name: dict) -> dict:
    """The other way: a snapshot's AdamW state (any strategy's) for zero.load_state_dict."""
    index = {name: i for i, name in enumerate(parameter_names(model, zero.param_groups))}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


class Trainer:
    def __init__(self, cfg, model: GPT, data: CharData, rt: ddp_setup.Runtime, resume_from: Optional[dict] = None):
        self.cfg = cfg  # the whole Config: it goes into every snapshot
        self.tcfg = tcfg = cfg.trainer
        self.rt = rt
        if tcfg.deterministic:
            use_deterministic_kernels()
        self.data = data.to(rt.device)
        self.dtype = resolve_dtype(tcfg.dtype, rt.device)
        self.fsdp = tcfg.strategy == "fsdp"
        self.zero1 = tcfg.strategy == "zero1"
        self.accum_steps = micro_steps_per_rank(tcfg, rt.world_size)
        if self.fsdp:  # sharded before the optimizer exists: it must see (and step) the shards
            self.raw_model = shard(model, rt, self.dtype, tcfg.reshard_after_forward)
            self.autocast = nullcontext()  # the sharding's MixedPrecisionPolicy casts instead
        else:
            self.raw_model = model.to(rt.device)  # the plain GPT: its state_dict has clean names
            self.autocast = (nullcontext() if self.dtype == torch.float32
                             else torch.autocast(rt.device.type, dtype=self.dtype))
        if rt.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True

        # More ranks mean a larger global batch per step (unless it is fixed); optionally raise the
        # learning rate with it.
        exponent = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[tcfg.lr_scaling]
        batch_growth = 1.0 if tcfg.fixed_global_batch else rt.world_size / tcfg.lr_base_world_size
        self.lr_scale = batch_growth ** exponent
        self.max_lr = tcfg.learning_rate * self.lr_scale
        self.min_lr = (tcfg.min_lr if tcfg.min_lr is not None else tcfg.learning_rate / 10) * self.lr_scale
        self.lr_decay_iters = tcfg.lr_decay_iters or tcfg.max_iters

        self.optimizer, self.optimizer_kind = make_optimizer(self.raw_model, tcfg, self.max_lr)
        # float16 has a narrow range: scale the loss up so small gradients don't flush to zero.
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.elapsed_s = 0.0  # training wall time, carried over a resume
        self.last_val_loss = None
        if resume_from is not None:
            self._restore(resume_from)

        # torch.compile inside, DDP outside (README, "compile and DDP"): Dynamo's DDPOptimizer still
        # cuts the compiled graph at DDP's bucket boundaries, so each bucket's all-reduce starts
        # during backward; eval uses the compiled model without DDP; the saved weights come from
        # raw_model, so no "_orig_mod." or "module." prefixes.
        self.model = torch.compile(self.raw_model) if tcfg.compile else self.raw_model
        self.ddp_model = (wrap_ddp(self.model, rt, tcfg)
                          if rt.distributed and tcfg.strategy in ("ddp", "zero1") else None)
        self.handmade = (handmade.HandmadeDDP(self.raw_model, tcfg.bucket_cap_mb, rt.world_size)
                         if rt.distributed and tcfg.strategy == "handmade" else None)
        self.tokens_per_step = (tcfg.batch_size * model.cfg.block_size * self.accum_steps
                                * rt.world_size)
        self.flops_per_step = self.raw_model.flops_per_token() * self.tokens_per_step
        self.peak_flops, self.peak_source = mfu.peak_flops(rt.device, self.dtype, tcfg.peak_flops)
        self.progress = None

    # ---- learning rate -------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        """Linear warmup to max_lr, then a cosine down to min_lr at lr_decay_iters, then flat."""
        if it < self.tcfg.warmup_iters:
            return self.max_lr * (it + 1) / (self.tcfg.warmup_iters + 1)
        if it >= self.lr_decay_iters:
            return self.min_lr
        progress = (it - self.tcfg.warmup_iters) / max(1, self.lr_decay_iters - self.tcfg.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self, it: int) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns this rank's mean loss
        (a tensor, so the caller decides when to pay for a device->host copy)."""
        loss = self.accumulate_gradients(it)
        self.optimizer_step()
        return loss

    def gradient_sync(self, enabled: bool):
        """Gradients are averaged across ranks during backward() (DDP: all-reduce; FSDP: reduce-scatter).
        Before the last micro-step they are still accumulating, so that traffic is wasted: skip it.
        DDP decides in forward() whether the coming backward() syncs: no_sync() must cover both."""
        if self.fsdp:
            self.raw_model.set_requires_gradient_sync(enabled)
            return nullcontext()
        if enabled:
            return nullcontext()
        if self.handmade is not None:
            return self.handmade.no_sync()
        return self.ddp_model.no_sync() if self.ddp_model is not None else nullcontext()

    def accumulate_gradients(self, it: int) -> torch.Tensor:
        tcfg, rt = self.tcfg, self.rt
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(it)
        # Dropout masks depend only on (seed, step, rank): a resumed run draws the same ones.
        torch.manual_seed(tcfg.seed + it * rt.world_size + rt.rank)
        train_model = self.ddp_model or self.model
        loss_sum = torch.zeros((), device=rt.device)
        for micro_step in range(self.accum_steps):
            x, y = self.data.train_batch(it, tcfg.seed, tcfg.batch_size, micro_step,
                                         self.accum_steps, rt.rank, rt.world_size)
            with self.gradient_sync(enabled=micro_step == self.accum_steps - 1):
                # (record_function: names on the profiler's timeline, notebook 08)
                with self.autocast, record_function("forward"):
                    _, loss = train_model(x, y)
                loss = loss / self.accum_steps  # so the accumulated gradient is a mean
                with record_function("backward"):
                    self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if self.handmade is not None:
            with record_function("wait for the all-reduces"):
                self.handmade.finish_gradient_sync()  # and take the means
        return loss_sum

    @record_function("optimizer step")
    def optimizer_step(self):
        tcfg = self.tcfg
        if tcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tcfg.grad_clip)
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of validation batches that the ranks share out, averaged
        over all ranks: the same number whatever the world size."""
        self.model.eval()
        totals = torch.zeros(2, device=self.rt.device)  # loss sum, batch count
        for x, y in self.data.val_batches(self.tcfg.eval_iters, self.tcfg.batch_size, self.tcfg.seed,
                                          self.rt.rank, self.rt.world_size):
            with self.autocast:
                _, loss = self.model(x, y)
            totals += torch.stack((loss.float(), torch.ones((), device=self.rt.device)))
        ddp_setup.sum_across_ranks(self.rt, totals)
        self.model.train()
        return (totals[0] / totals[1]).item()

    def mean_loss_across_ranks(self, loss: torch.Tensor) -> float:
        total = ddp_setup.sum_across_ranks(self.rt, loss.detach().clone())
        return total.item() / self.rt.world_size

    # ---- snapshots -----------------------------------------------------------------------
    # One file whatever the strategy: whole tensors under the model's own names, so sample.py reads it
    # and a run resumes it under DDP or FSDP, on any number of ranks. The state_dict helpers of
    # torch.distributed.checkpoint gather the shards for it and split them again on the way back.
    def full_state(self) -> tuple:
        """(model weights, AdamW state) as whole tensors on rank 0's CPU ({} elsewhere).
        Every rank must call it: under FSDP it gathers the shards, under zero1 the AdamW state."""
        options = (StateDictOptions(full_state_dict=True, cpu_offload=True) if self.rt.distributed
                   else StateDictOptions())
        model_state = get_model_state_dict(self.raw_model, options=options)
        if self.zero1:
            self.optimizer.consolidate_state_dict(to=0)  # every rank sends its part to rank 0
            if not self.rt.is_main:
                return model_state, {}
            return model_state, zero1_state_by_name(self.raw_model, self.optimizer)
        optimizer_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=options)
        return model_state, optimizer_state

    def local_optimizer_state(self) -> list:
        """The AdamW state tensors this rank holds (zero1: its own part; FSDP: its shards)."""
        optimizer = self.optimizer.optim if self.zero1 else self.optimizer
        return [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v)]

    def save_snapshot(self):
        """Every rank calls it; rank 0 alone writes, so there is one snapshot and one resume point."""
        model_state, optimizer_state = self.full_state()
        if self.rt.is_main:
            snapshot.save_atomically({
                "model": model_state,
                "optimizer": optimizer_state,  # AdamW moments: needed to resume exactly
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "elapsed_s": self.elapsed_s,
                "config": asdict(self.cfg),
                "vocab": self.data.vocab.chars,
            }, self.tcfg.snapshot_path)

    def _restore(self, state: dict):
        """Rank 0 holds the snapshot's tensors and sends them: each rank keeps what it needs (under FSDP,
        its shards). The other ranks pass state without "model" and "optimizer"."""
        options = (StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if self.rt.distributed
                   else StateDictOptions())
        set_model_state_dict(self.raw_model, state.get("model", {}), options=options)
        if self.zero1:
            # ZeroRedundancyOptimizer.load_state_dict takes the whole state on every rank and keeps
            # its part: the simple way, at the price of a whole copy per rank for a moment.
            whole = [state.get("optimizer")]
            torch.distributed.broadcast_object_list(whole, src=0)
            by_index = zero1_state_by_index(self.raw_model, self.optimizer, whole[0])
            self.optimizer.load_state_dict(by_index)
        else:
            set_optimizer_state_dict(self.raw_model, self.optimizer, state.get("optimizer", {}),
                                     options=options)
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.elapsed_s = state.get("elapsed_s", 0.0)

    # ---- logging -------------------------------------------------------------------------
    def say(self, message: str):
        if self.rt.is_main:
            line = f"{self.rt.tag} {message}"
            if self.progress is not None:
                self.progress.write(line)  # keeps the bar at the bottom
            else:
                print(line, flush=True)

    def record(self, **fields):
        if self.rt.is_main and self.tcfg.log_file:
            with open(self.tcfg.log_file, "a") as f:
                f.write(json.dumps(fields) + "\n")

    # ---- the loop ------------------------------------------------------------------------
    def fit(self):
        tcfg, rt = self.tcfg, self.rt
        if self.step >= tcfg.max_iters:
            raise SystemExit(f"error: the snapshot is at step {self.step}, trainer.max_iters={tcfg.max_iters} "
                             "leaves nothing to train; raise trainer.max_iters")
        resumed_at = self.step if self.step > 0 else None
        if rt.is_main and tcfg.log_file:
            Path(tcfg.log_file).parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is None:
                open(tcfg.log_file, "w").close()  # a fresh run starts a fresh log; a resumed one appends
        if rt.is_main and sys.stderr.isatty():
            self.progress = tqdm(total=tcfg.max_iters, initial=self.step, unit="it", dynamic_ncols=True)

        run_start, elapsed_before = time.perf_counter(), self.elapsed_s
        window_start, window_steps = run_start, 0  # tokens/s counts training steps only, not evaluations
        self.raw_model.train()
        while True:
            it = self.step
            is_eval_point = it == tcfg.max_iters or (tcfg.eval_interval > 0 and it % tcfg.eval_interval == 0)
            if is_eval_point and it != resumed_at:  # a resumed run has this evaluation already
                self.last_val_loss = self.evaluate()
                self.elapsed_s = elapsed_before + time.perf_counter() - run_start
                self.say(f"eval | iter {it} | val loss {self.last_val_loss:.4f}")
                self.record(iter=it, val_loss=self.last_val_loss, elapsed_s=round(self.elapsed_s, 3))
                if tcfg.snapshot_path and it > 0:
                    self.save_snapshot()
                window_start, window_steps = time.perf_counter(), 0
            if it == tcfg.max_iters:
                break

            loss = self.train_step(it)
            self.step = it + 1
            window_steps += 1
            if self.progress is not None:
                self.progress.update(1)
            if self.step % tcfg.log_interval == 0 or self.step == tcfg.max_iters:
                loss_value = self.mean_loss_across_ranks(loss)  # .item() also waits for the GPU
                now = time.perf_counter()
                seconds = now - window_start
                self.elapsed_s = elapsed_before + now - run_start
                tokens_per_s = window_steps * self.tokens_per_step / seconds
                utilisation = tokens_per_s * self.raw_model.flops_per_token() / (self.peak_flops * rt.world_size)
                self.say(f"iter {self.step}/{tcfg.max_iters} | loss {loss_value:.4f} | lr {self.lr_at(it):.2e} | "
                         f"{tokens_per_s:,.0f} tok/s | mfu {100 * utilisation:.1f}% | "
                         f"{1000 * seconds / window_steps:.1f} ms/iter")
                self.record(iter=self.step, loss=loss_value, lr=self.lr_at(it), tokens_per_s=round(tokens_per_s, 1),
                            mfu=round(utilisation, 5), elapsed_s=round(self.elapsed_s, 3))
                window_start, window_steps = now, 0
        if self.progress is not None:
            self.progress.close()
            self.progress = None
