"""The commands the README shows are the commands that work.

Every ```bash block that follows a `<!-- tested ... -->` line in a README is run as written,
with bash, in a scratch folder that links to the repository's files (so what the commands
write stays out of the repository), with this virtualenv's `python` and `torchrun` first
on PATH, on the CPU. It must exit 0 and print no Python traceback, on stdout or stderr (where
tracebacks go), unless its marker says `<!-- tested, traceback expected -->` (a crash demo).
"""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import REPO, aborted_only_at_exit, cpu_env

READMES = [REPO / "README.md", *sorted(REPO.glob("*/README.md"))]
BLOCK = re.compile(r"<!-- tested([^>]*)-->\s*```bash\n(.*?)```", re.S)


def readme_blocks():
    for readme in READMES:
        for number, match in enumerate(BLOCK.finditer(readme.read_text())):
            block, traceback_expected = match.group(2), "traceback expected" in match.group(1)
            first = next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))
            yield pytest.param(readme, block, traceback_expected,
                               id=f"{readme.relative_to(REPO).parent}#{number}:{first[:60]}")


def scratch_copy(tmp_path: Path, readme: Path) -> Path:
    """A folder that looks like the README's folder: links to every file and folder in it."""
    for entry in readme.parent.iterdir():
        if entry.name not in (".git", ".venv", "runs"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def test_readmes_have_readme_blocks():
    assert len(list(readme_blocks())) >= 4


@pytest.mark.parametrize("readme,block,traceback_expected", list(readme_blocks()))
def test_readme_block_runs(tmp_path, readme, block, traceback_expected):
    env = cpu_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def run_block(folder: Path):
        folder.mkdir()
        return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=scratch_copy(folder, readme), env=env,
                              capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)

    proc = run_block(tmp_path / "first")
    if proc.returncode != 0 and aborted_only_at_exit(proc):  # PyTorch's exit abort (see conftest): once more
        warnings.warn(f"README block hit the Gloo exit abort (see README, troubleshooting); running it again: {block}")
        proc = run_block(tmp_path / "again")
    assert proc.returncode == 0, f"{block}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    if not traceback_expected:
        assert "Traceback" not in proc.stdout + proc.stderr, f"{block}\n--- stderr ---\n{proc.stderr[-3000:]}"
