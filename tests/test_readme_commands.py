"""The commands the READMEs show are the commands that work.

Every ```bash block of README.md and slurm/README.md has a marker on the line above it, and
the count of blocks is checked, so none goes unmarked:
* `<!-- tested: ... -->`: run here as written, once (no second try), with bash, in a scratch
  folder that links to the repository's files, with this virtualenv's python and torchrun first
  on PATH, on the CPU. It must exit 0 and print no traceback; the output block after it (```text)
  must show lines the run printed (numbers aside: another CPU may round differently).
* `<!-- tested by tests/test_x.py -->`: a step test runs these very commands (adding only
  observations: a log, every rank's weights). Checked here as text: every command of the block
  is one of that test module's README_* strings, which the test runs.
* `<!-- untested: why -->`: needs what a test cannot have (two machines, a cluster, Windows).
"""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env

READMES = {REPO / "README.md": 13, REPO / "slurm" / "README.md": 3}  # bash blocks in each
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\s*)?```bash\n(?P<body>.*?)```"
                   r"(?:\s*```text\n(?P<output>.*?)```)?", re.S)
NUMBER = re.compile(r"\d+(\.\d+)?(e[-+]?\d+)?")


def blocks(readme: Path):
    return [m.groupdict() for m in BLOCK.finditer(readme.read_text())]


def commands(body: str) -> list:
    """The block's command lines: comments, blank lines and trailing comments left out."""
    lines = [line.split("  #")[0].strip() for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_bash_block_is_marked(readme):
    found = blocks(readme)
    assert len(found) == READMES[readme], "a bash block was added or removed: update READMES"
    for block in found:
        marker = block["marker"] or ""
        assert re.fullmatch(r"tested: .+|tested by tests/test_\w+\.py|untested: .+", marker), \
            f"unmarked block in {readme.name}:\n{block['body']}"


def marked(kind: str):
    for readme in READMES:
        for number, block in enumerate(blocks(readme)):
            if (block["marker"] or "").startswith(kind):
                first = commands(block["body"])[0][:60]
                yield pytest.param(block, id=f"{readme.relative_to(REPO)}#{number}:{first}")


@pytest.mark.parametrize("block", list(marked("tested by ")))
def test_block_is_what_its_test_runs(block):
    module = importlib.import_module(Path(block["marker"].split()[-1]).stem)
    run_there = {value for name, value in vars(module).items()
                 if name.startswith("README") and isinstance(value, str)}
    for command in commands(block["body"]):
        assert command in run_there, f"{block['marker']} does not run: {command}"


@pytest.mark.parametrize("block", list(marked("tested: ")))
def test_block_runs_as_written(tmp_path, block):
    for entry in REPO.iterdir():  # the README's folder, with nothing written into it
        if entry.name not in (".git", ".venv", "runs"):
            (tmp_path / entry.name).symlink_to(entry)
    env = cpu_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{block['body']}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    printed = {NUMBER.sub("N", line) for line in done.stdout.splitlines()}
    for line in (block["output"] or "").splitlines():
        if line != "...":
            assert NUMBER.sub("N", line) in printed, f"the README shows a line not printed: {line}"
