"""Configuration: a yaml file, then KEY=VALUE overrides from the command line.

    python main.py config=minGPT-ddp/cpu_cfg.yaml trainer.max_iters=200 model.n_layer=4

The schema is the three dataclasses below; omegaconf checks types against them. A key
that is not in the schema stops the run with the list of valid keys: a typo must not
silently train with the default. validate() then checks that every value is in its range.
Every mistake ends the same way: one line `error: ...` and exit code 2, before any process
waits for another.
"""
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import machine
from char_dataset import DataConfig
from model import ModelConfig
import trainer
from trainer import TrainerConfig, config_error

HERE = Path(__file__).resolve().parent


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def default_config_path() -> Path:
    """The classic GPT config where the processes get GPUs; a small one that trains in a minute on
    CPU processes (machine.mingpt_config: the same rule that picks the device)."""
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return HERE / machine.mingpt_config(machine.Machine.here(), processes_per_node)


def leaf_keys(tree: dict, prefix: str = "") -> list:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def reject_unknown_keys(tree: dict, where: str):
    valid = leaf_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
    for key in leaf_keys(tree):
        if key not in valid:
            section = key.split(".")[0]
            same_section = [k for k in valid if k.startswith(section + ".")]
            raise config_error(f"unknown config key '{key}' ({where}); valid keys: "
                               f"{', '.join(same_section or valid)}")


def split_args(args: list):
    """config=PATH (if given) and the other KEY=VALUE overrides."""
    config_path, overrides = None, []
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            raise config_error(f"expected KEY=VALUE, got '{arg}' (see --help)")
        if arg.startswith("config="):
            config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return config_path, overrides


def load(args: list):
    """(Config, the yaml path, the overrides) from command-line arguments, or a one-line error."""
    cfg, config_path, overrides = parse(args)
    validate(cfg)
    return cfg, config_path, overrides


def parse(args: list):
    """load() without validate(): every value of the right type, not yet checked for its range."""
    config_path, overrides = split_args(args)
    config_path = Path(config_path) if config_path else default_config_path()
    try:
        from_file = OmegaConf.load(config_path)
    except FileNotFoundError:
        raise config_error(f"config file {config_path} not found") from None
    except Exception as e:  # yaml syntax
        raise config_error(f"cannot parse config file {config_path}: {str(e).splitlines()[0]}") from None
    file_tree = OmegaConf.to_container(from_file) or {}
    if not isinstance(file_tree, dict):
        raise config_error(f"config file {config_path} must hold a mapping of sections")
    reject_unknown_keys(file_tree, f"in {config_path}")
    # A data path written in a yaml file is relative to that file, so the config works from any directory.
    data_path = file_tree.get("data", {}).get("path")
    if data_path and not Path(data_path).is_absolute():
        from_file.data.path = str(config_path.parent / data_path)
    try:
        from_command_line = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise config_error(f"cannot parse overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    reject_unknown_keys(OmegaConf.to_container(from_command_line), "on the command line")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), from_file, from_command_line)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # a value of the wrong type
        key = getattr(e, "full_key", None) or "?"
        raise config_error(f"bad value for config key {key}: {str(e).splitlines()[0]}") from None
    return cfg, config_path, overrides


def rules(cfg: Config) -> tuple:
    """(key, test of its value, the allowed range in words) for every rule, in the order they run.

    A rule may rely on the keys checked above it (n_head >= 1 before n_embd % n_head). Without
    them a bad value trains nonsense: model.block_size=0 gives NaN losses and exits 0,
    trainer.beta2=1.5 makes AdamW diverge. (tests/test_mingpt_config.py has a case for every rule:
    a new rule needs its own.)
    """
    m, t = cfg.model, cfg.trainer
    return (
        ("model.n_layer", lambda v: v >= 1, "at least 1"),
        ("model.n_head", lambda v: v >= 1, "at least 1"),
        ("model.n_embd", lambda v: v >= 1, "at least 1"),
        ("model.n_embd", lambda v: v % m.n_head == 0, f"a multiple of model.n_head ({m.n_head})"),
        ("model.block_size", lambda v: v >= 1, "at least 1"),
        ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("data.train_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
        ("trainer.max_iters", lambda v: v >= 1, "at least 1"),
        ("trainer.batch_size", lambda v: v >= 1, "at least 1"),
        ("trainer.grad_accum_steps", lambda v: v >= 1, "at least 1"),
        ("trainer.learning_rate", lambda v: v > 0, "positive"),
        ("trainer.min_lr", lambda v: v is None or 0 <= v <= t.learning_rate,
         f"null (learning_rate / 10) or between 0 and trainer.learning_rate ({t.learning_rate})"),
        ("trainer.warmup_iters", lambda v: v >= 0, "0 or more"),
        ("trainer.lr_decay_iters", lambda v: v is None or v >= 1, "null (trainer.max_iters) or at least 1"),
        ("trainer.lr_decay_iters", lambda v: v is None or v >= t.warmup_iters,
         f"null or at least trainer.warmup_iters ({t.warmup_iters}), for the decay follows the warmup"),
        ("trainer.lr_scaling", lambda v: v in trainer.LR_SCALINGS, f"one of {', '.join(trainer.LR_SCALINGS)}"),
        ("trainer.lr_base_world_size", lambda v: v >= 1, "at least 1"),
        ("trainer.weight_decay", lambda v: v >= 0, "0 or more"),
        ("trainer.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("trainer.beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("trainer.grad_clip", lambda v: v >= 0, "0 (no clipping) or more"),
        ("trainer.eval_interval", lambda v: v >= 0, "0 (only at the end) or more"),
        ("trainer.eval_iters", lambda v: v >= 1, "at least 1"),
        ("trainer.log_interval", lambda v: v >= 1, "at least 1"),
        ("trainer.resume", lambda v: v.lower() in trainer.RESUME_CHOICES, f"one of {', '.join(trainer.RESUME_CHOICES)}"),
        ("trainer.resume", lambda v: v.lower() == "false" or t.snapshot_path, "false without a trainer.snapshot_path"),
        ("trainer.dtype", lambda v: v in ("auto", *trainer.DTYPES), f"one of auto, {', '.join(trainer.DTYPES)}"),
        ("trainer.peak_flops", lambda v: v is None or v > 0, "null (data sheet or measured) or positive"),
        ("trainer.strategy", lambda v: v in trainer.STRATEGIES, f"one of {', '.join(trainer.STRATEGIES)}"),
        ("trainer.reshard_after_forward", lambda v: v or t.strategy == "fsdp",
         "true unless trainer.strategy=fsdp (an FSDP setting)"),
        ("trainer.bucket_cap_mb", lambda v: v > 0, "positive"),
        ("trainer.comm_hook", lambda v: v in trainer.COMM_HOOKS,
         f"one of {', '.join(trainer.COMM_HOOKS)}"),
        ("trainer.comm_hook", lambda v: v == "none" or t.strategy in ("ddp", "zero1"),
         "none unless trainer.strategy is ddp or zero1 (a hook of torch's DDP)"),
        ("trainer.timeout_minutes", lambda v: v > 0, "positive"),
    )


def first_broken_rule(cfg: Config):
    """(index, key, value, allowed) of the first rule that cfg breaks, or None."""
    for index, (key, ok, allowed) in enumerate(rules(cfg)):
        value = operator.attrgetter(key)(cfg)
        if not ok(value):
            return index, key, value, allowed
    return None


def validate(cfg: Config):
    """Every value in its range, or one line naming the key and the range (exit code 2)."""
    broken = first_broken_rule(cfg)
    if broken:
        _, key, value, allowed = broken
        raise config_error(f"{key}={value}: must be {allowed}")


def as_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(tree: dict) -> Config:
    """A Config back from the plain dict a snapshot stores."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), tree))
