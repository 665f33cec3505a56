"""Save training state so that a crash, a pre-emption or a time limit costs minutes, not
the run; and load it back, for resuming or for sampling."""
import hashlib
import os
import socket
from pathlib import Path

import torch

# What every snapshot holds; a file without these keys is not one of ours.
REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "config", "vocab")


def save_atomically(state: dict, path: str):
    """Write to a temporary file, flush it to disk, then rename it over `path`.

    A rename is atomic: whoever reads `path` sees the old snapshot or the new one, never
    half of one, even if this process dies mid-write. The temporary name is unique per
    host and process, so nodes sharing a file system never write into each other's file.
    """
    directory = Path(path).resolve().parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp_path = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    with open(tmp_path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    # The rename itself lives in the directory: sync it too, or a power cut may forget it.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str) -> dict:
    """The snapshot at `path`, on the CPU, or a one-line error that says what is wrong."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: snapshot {path} not found")
    try:
        # weights_only=True: a snapshot holds tensors, numbers and strings, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: cannot read snapshot {path}: it is corrupt, truncated or not a snapshot "
                         f"({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise SystemExit(f"error: {path} is not a minGPT-ddp snapshot (it lacks {', '.join(REQUIRED_KEYS)})")
    return state


def describe(path: str) -> str:
    """What this machine holds at `path`, short enough to compare across nodes: "none", or the
    snapshot's step and a hash of its bytes (two copies of one snapshot are equal)."""
    if not os.path.isfile(path):
        return "none"
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    try:
        # mmap: the tensors stay on disk, only the small rest is read
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return f"unreadable, sha256 {digest}"
    return f"step {step}, sha256 {digest}"
