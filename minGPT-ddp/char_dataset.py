"""Character-level data: one vocabulary, one contiguous train/validation split, and
batches of random windows drawn the same way on every rank.

Why not a Dataset of overlapping windows + random_split? Neighbouring windows share all
but one character, so a random split puts almost every validation window's text in the
training set too, and the validation loss says nothing about generalisation. Here the
first `train_fraction` of the text trains and the rest validates: no character is in both.
"""
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# The default corpus: Python source files that ship with every CPython install, so the
# tutorial trains offline on any machine. A fixed list (not a directory walk) keeps it the
# same on every platform; only a different Python version changes the text (the data
# fingerprint printed at start shows it). About 1.4 MB, close to tiny shakespeare's 1.1 MB.
STDLIB_MODULES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py", "enum.py",
    "functools.py", "gettext.py", "gzip.py", "heapq.py", "inspect.py", "ipaddress.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "operator.py", "optparse.py",
    "pickle.py", "pprint.py", "queue.py", "random.py", "shutil.py", "statistics.py", "string.py",
    "textwrap.py", "threading.py", "tokenize.py",
)


@dataclass
class DataConfig:
    path: Optional[str] = None  # a text file; None: the Python standard library sources above
    train_fraction: float = 0.9  # the first 90% of the text trains, the last 10% validates


def stdlib_corpus() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in STDLIB_MODULES:
        path = stdlib / name
        if path.is_file():  # a module a future Python drops just leaves the corpus a bit shorter
            parts.append(path.read_text(encoding="utf-8"))
    if not parts:
        raise SystemExit(f"error: no Python standard library sources under {stdlib} to train on; "
                         "pass data.path=FILE with any text file")
    return "\n".join(parts)


def read_text(path: Optional[str]) -> str:
    if path is None:
        text = stdlib_corpus()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SystemExit(f"error: data file {path} not found (set data.path=FILE; "
                             "for tiny shakespeare run: python minGPT-ddp/prepare.py)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read data file {path} as UTF-8 text: {e}") from None
    # Windows checkouts and files carry \r\n; one newline convention keeps the vocabulary the same.
    return text.replace("\r\n", "\n")


class CharVocab:
    """Every distinct character is a token; the ids follow sorted order, so the same text
    gives the same ids on every rank and every run."""

    def __init__(self, chars: str):
        self.chars = chars
        self.codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    def __len__(self):
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        # utf-32 gives one integer per character, so numpy maps a whole file at once.
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self.codepoints, codepoints)
        ids_clipped = np.minimum(ids, len(self.chars) - 1)
        unknown = self.codepoints[ids_clipped] != codepoints
        if unknown.any():
            bad = sorted(set(chr(c) for c in codepoints[unknown]))
            raise ValueError(f"characters not in the vocabulary: {''.join(bad)!r}")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class CharData:
    """The encoded text split in two contiguous parts, and the batch draws for each."""

    def __init__(self, cfg: DataConfig, block_size: int):
        text = read_text(cfg.path)
        self.source = cfg.path or "python standard library sources"
        self.vocab = CharVocab.from_text(text)
        tokens = self.vocab.encode(text)
        n_train = int(len(tokens) * cfg.train_fraction)
        self.train, self.val = tokens[:n_train], tokens[n_train:]
        self.block_size = block_size
        for name, split in (("training", self.train), ("validation", self.val)):
            if len(split) < block_size + 1:
                raise SystemExit(f"error: the {name} split of {self.source} has {len(split)} characters, "
                                 f"fewer than model.block_size+1 = {block_size + 1}; use more text")

    def fingerprint(self) -> str:
        """A short hash of vocabulary and both splits: equal on two ranks means same data."""
        digest = hashlib.sha256(self.vocab.chars.encode("utf-8"))
        for split in (self.train, self.val):
            digest.update(split.numpy().tobytes())
        return digest.hexdigest()[:12]

    def to(self, device: torch.device) -> "CharData":
        # A character corpus is a few MB: keeping it on the GPU saves a copy per step.
        self.train, self.val = self.train.to(device), self.val.to(device)
        return self

    def _windows(self, split: torch.Tensor, offsets: torch.Tensor):
        """Inputs are the windows at `offsets`, targets the same windows one character later."""
        if split.device.type == "cuda":
            # From pinned (page-locked) memory the copy is queued on the GPU and the CPU moves on; from
            # ordinary memory it waits for the GPU to finish its queue, every batch. Only for CUDA: pinning
            # would start a CUDA context in every CPU-only rank of a GPU machine.
            offsets = offsets.pin_memory()
        index = offsets.to(split.device, non_blocking=True)[:, None] + torch.arange(self.block_size + 1, device=split.device)
        window = split[index]
        return window[:, :-1], window[:, 1:]

    def train_batch(self, step: int, seed: int, batch_size: int, micro_step: int, grad_accum_steps: int,
                    rank: int, world_size: int):
        """The micro-batch this rank trains on at (step, micro_step).

        Every rank draws the same offsets for the whole global batch from a generator
        seeded by (seed, step) and keeps its own slice, as DistributedSampler would. So:
          * ranks never train on the same windows in a step;
          * 2 ranks x 1 micro-step and 1 rank x 2 micro-steps see exactly the same data;
          * the data of step N does not depend on what ran before: resuming reproduces it.
        """
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        global_batch = batch_size * grad_accum_steps * world_size
        offsets = torch.randint(len(self.train) - self.block_size, (global_batch,), generator=generator)
        share = micro_step * world_size + rank
        return self._windows(self.train, offsets[share * batch_size:(share + 1) * batch_size])

    def val_batches(self, n_batches: int, batch_size: int, seed: int, rank: int, world_size: int):
        """This rank's share of a fixed set of validation batches (batch i goes to rank i % world_size).

        The set is the same at every evaluation and for every world size, so validation
        losses compare across time and across runs; the ranks split the work between them.
        """
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.randint(len(self.val) - self.block_size, (n_batches, batch_size), generator=generator)
        for i in range(rank, n_batches, world_size):
            yield self._windows(self.val, offsets[i])
