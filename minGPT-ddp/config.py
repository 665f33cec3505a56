"""Configuration: a yaml file, then KEY=VALUE overrides from the command line.

    python main.py config=minGPT-ddp/cpu_cfg.yaml trainer.max_iters=200 model.n_layer=4

The schema is the three dataclasses below; omegaconf checks types against them. A key
that is not in the schema stops the run with the list of valid keys: a typo must not
silently train with the default.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from char_dataset import DataConfig
from model import ModelConfig
from trainer import TrainerConfig, check_config

HERE = Path(__file__).resolve().parent


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def default_config_path() -> Path:
    """The classic GPT config where there is a GPU; a small one that trains in a minute on a CPU."""
    has_gpu = torch.accelerator.current_accelerator(check_available=True) is not None
    return HERE / ("gpt2_train_cfg.yaml" if has_gpu else "cpu_cfg.yaml")


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
            raise SystemExit(f"error: unknown config key '{key}' ({where}); valid keys: "
                             f"{', '.join(same_section or valid)}")


def split_args(args: list):
    """config=PATH (if given) and the other KEY=VALUE overrides."""
    config_path, overrides = None, []
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            raise SystemExit(f"error: expected KEY=VALUE, got '{arg}' (see --help)")
        if arg.startswith("config="):
            config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return config_path, overrides


def load(args: list):
    """(Config, the yaml path, the overrides) from command-line arguments, or a one-line error."""
    config_path, overrides = split_args(args)
    config_path = Path(config_path) if config_path else default_config_path()
    try:
        from_file = OmegaConf.load(config_path)
    except FileNotFoundError:
        raise SystemExit(f"error: config file {config_path} not found") from None
    except Exception as e:  # yaml syntax
        raise SystemExit(f"error: cannot parse config file {config_path}: {str(e).splitlines()[0]}") from None
    file_tree = OmegaConf.to_container(from_file) or {}
    if not isinstance(file_tree, dict):
        raise SystemExit(f"error: config file {config_path} must hold a mapping of sections")
    reject_unknown_keys(file_tree, f"in {config_path}")
    # A data path written in a yaml file is relative to that file, so the config works from any directory.
    data_path = file_tree.get("data", {}).get("path")
    if data_path and not Path(data_path).is_absolute():
        from_file.data.path = str(config_path.parent / data_path)
    try:
        from_command_line = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise SystemExit(f"error: cannot parse overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    reject_unknown_keys(OmegaConf.to_container(from_command_line), "on the command line")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), from_file, from_command_line)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # a value of the wrong type
        key = getattr(e, "full_key", None) or "?"
        raise SystemExit(f"error: bad value for config key {key}: {str(e).splitlines()[0]}") from None
    if cfg.model.n_embd % cfg.model.n_head != 0:
        raise SystemExit(f"error: model.n_embd ({cfg.model.n_embd}) must be a multiple of "
                         f"model.n_head ({cfg.model.n_head})")
    check_config(cfg.trainer)
    return cfg, config_path, overrides


def as_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(tree: dict) -> Config:
    """A Config back from the plain dict a snapshot stores."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), tree))
