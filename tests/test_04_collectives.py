"""Step 04: every collective demo, checked value by value from its JSON log, for several world sizes.

One run of the script per world size covers all demos (starting processes is what costs time).
The expected values are worked out here from the documented semantics of each primitive, not
taken from the script.
"""
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run, torchrun

SCRIPT = "04_collectives_intro.py"
SMALL = ["--bench_mb", "0.25", "--bench_iters", "2", "--manual_steps", "3"]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_04(world_size, how, tmp_path, *args):
    """Run step 04 the way the README says: torchrun, or plain python (mp.spawn) with --world_size."""
    if how == "torchrun":
        cmd = torchrun(world_size, SCRIPT, *args)
    else:
        cmd = [sys.executable, REPO / SCRIPT, "--world_size", world_size, *args]
    return run(cmd, cwd=tmp_path)


def by_demo(path):
    records = {}
    for record in read_log(path):
        records.setdefault(record["demo"], []).append(record)
    return records


# world size 2: the README's command, default settings; 3 and 4: small benchmark and training settings
@pytest.fixture(scope="module", params=[(2, "torchrun", []), (3, "spawn", SMALL), (4, "torchrun", SMALL)],
                ids=lambda p: f"world{p[0]}-{p[1]}")
def full_run(request, tmp_path_factory):
    """All demos, once per world size: (world_size, stdout, {demo: [log records]})."""
    world_size, how, settings = request.param
    tmp = tmp_path_factory.mktemp(f"step04_w{world_size}")
    proc = start_04(world_size, how, tmp, *settings, "--log_file", "collectives.jsonl")
    return world_size, proc.stdout, by_demo(tmp / "collectives.jsonl")


def one(by_demo, name, world_size):
    (record,) = by_demo[name]
    assert record["world_size"] == world_size
    return record["before"], record["after"]


def labelled(rank, n):
    """The demos' per-rank tensors: rank r holds 10*(r+1) + [0, 1, ..., n-1]."""
    return [10.0 * (rank + 1) + i for i in range(n)]


def test_output_and_every_demo_logged(full_run):
    n, stdout, by_demo = full_run
    assert stdout.splitlines()[0] == f"[cpu:0] device cpu | backend gloo | world_size {n} | threads per process 1"
    assert stdout.splitlines()[-1] == f"[cpu:0] Finished training: 13 demo(s) on world_size {n}"
    assert set(by_demo) == {"send_recv", "isend_irecv", "broadcast", "reduce", "all_reduce", "all_gather",
                            "gather", "scatter", "reduce_scatter", "barrier", "new_group", "ring_all_reduce",
                            "ring_bandwidth", "manual_ddp"}
    # Rank 0 prints every rank's row, in rank order, once per demo table.
    rows = [line for line in stdout.splitlines() if line.startswith("[cpu:0]     rank ")]
    ranks = [int(line.split()[2].rstrip(":")) for line in rows]
    assert ranks == list(range(n)) * (len(rows) // n) and len(rows) == 15 * n


def test_point_to_point(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "send_recv", n)
    assert before == [[1, 2, 3, 4]] + [[0, 0, 0, 0]] * (n - 1)
    assert after == [[1, 2, 3, 4], [1, 2, 3, 4]] + [[0, 0, 0, 0]] * (n - 2)  # only rank 1 received
    before, after = one(by_demo, "isend_irecv", n)
    assert before == [labelled(r, 3) for r in range(n)]
    assert after == [before[(r - 1) % n] for r in range(n)]  # each got its left neighbour's tensor


def test_broadcast_reduce_all_reduce(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "broadcast", n)
    assert before == [labelled(r, 4) for r in range(n)]
    assert after == [before[0]] * n

    inputs = np.array([[r + 1, n - r, 10 * (r + 1), 10 * (n - r)] for r in range(n)], dtype=np.float64)
    before, after = one(by_demo, "reduce", n)
    assert before == inputs.tolist()
    assert after == [inputs.sum(0).tolist()] + [[]] * (n - 1)  # defined on the destination only

    expected = {"SUM": inputs.sum(0), "AVG": inputs.mean(0), "MAX": inputs.max(0)}
    records = by_demo["all_reduce"]
    assert [r["op"] for r in records] == ["SUM", "AVG", "MAX"]
    for record in records:
        assert record["before"] == inputs.tolist()
        assert np.allclose(record["after"], [expected[record["op"]]] * n, rtol=0, atol=1e-6), record


def test_gather_scatter_family(full_run):
    n, _, by_demo = full_run
    everyone = sum((labelled(r, 2) for r in range(n)), [])
    before, after = one(by_demo, "all_gather", n)
    assert before == [labelled(r, 2) for r in range(n)] and after == [everyone] * n
    before, after = one(by_demo, "gather", n)
    assert before == [labelled(r, 2) for r in range(n)] and after == [everyone] + [[]] * (n - 1)
    before, after = one(by_demo, "scatter", n)
    assert before == [everyone] + [[]] * (n - 1)
    assert after == [labelled(r, 2) for r in range(n)]

    (record,) = by_demo["reduce_scatter"]
    pieces = np.array([[(r + 1) * (k + 1) for k in range(2 * n)] for r in range(n)], dtype=np.float64)
    assert record["before"] == pieces.tolist()
    total = pieces.sum(0)
    assert record["after"] == [total[2 * r:2 * r + 2].tolist() for r in range(n)]
    assert record["fallback"] == record["after"]  # the all_reduce fallback gives the same pieces
    assert record["method"] in ("native", "fallback: all_reduce, keep own piece")


def test_barrier_and_subgroups(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "barrier", n)
    delays, waited = [b[0] for b in before], [a[0] for a in after]
    assert delays == pytest.approx([0.2 * r for r in range(n)])
    for r in range(n):  # nobody leaves before the last one (delay 0.2*(n-1)) has arrived
        assert waited[r] >= delays[-1] - delays[r] - 0.1, (r, waited)

    before, after = one(by_demo, "new_group", n)
    assert before == [[r + 1] for r in range(n)]
    assert after == [[sum(q + 1 for q in range(r % 2, n, 2))] for r in range(n)]


def test_ring_all_reduce_steps(full_run):
    """The ring by hand: chunked reduce-scatter then all-gather, n-1 steps each, on a length 2n+1 tensor."""
    n, _, by_demo = full_run
    records = by_demo["ring_all_reduce"]
    summary = [r for r in records if "phase" not in r]
    steps = [r for r in records if "phase" in r]
    assert [(r["phase"], r["step"]) for r in steps] == (
        [("reduce_scatter", k) for k in range(1, n)] + [("all_gather", k) for k in range(1, n)])

    (summary,) = summary
    start = np.array(summary["before"], dtype=np.float64)
    assert start.shape == (n, 2 * n + 1) and (2 * n + 1) % n != 0  # chunks of unequal length
    total = start.sum(0)
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(total, n)])  # torch.tensor_split cuts the same
    after_rs = np.array(steps[n - 2]["state"])
    for r in range(n):  # after reduce-scatter, rank r owns the full sum of chunk r+1
        c = (r + 1) % n
        assert after_rs[r, bounds[c]:bounds[c + 1]].tolist() == total[bounds[c]:bounds[c + 1]].tolist()
    assert steps[-1]["state"] == [total.tolist()] * n
    assert summary["after"] == [total.tolist()] * n
    # random tensors of sizes that do not divide by the world size: same as dist.all_reduce
    assert all(size % n for size in summary["sizes"])
    assert summary["matches_all_reduce"] is True and summary["max_abs_diff"] < 1e-4

    (bench,) = by_demo["ring_bandwidth"]
    assert (bench["bytes"], bench["iterations"]) == ((8 * 2**20, 5) if n == 2 else (0.25 * 2**20, 2))
    for key in ("ring_s", "all_reduce_s", "ring_busbw_GBps", "all_reduce_busbw_GBps"):
        assert math.isfinite(bench[key]) and bench[key] > 0


def test_manual_gradient_averaging_matches_ddp(full_run):
    n, _, by_demo = full_run
    (record,) = by_demo["manual_ddp"]
    assert record["steps"] == (5 if n == 2 else 3)
    before, after = record["before"], record["after"]
    assert before == [before[0]] * n and after == [after[0]] * n  # all copies stay identical
    assert not np.allclose(before[0], after[0])  # and they did train
    assert np.allclose(record["ddp_after"], after, rtol=0, atol=1e-6)
    assert record["max_abs_diff"] < 1e-6


RING_WORKER = """
import importlib.util, os, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("step04", sys.argv[1])
step04 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step04)
dist.init_process_group("gloo")
rank = dist.get_rank()
demos = step04.Demos(torch.device("cpu"), None, 1, 1, 1)
results = {}
for size in [int(s) for s in sys.argv[2].split(",")]:
    x = torch.randn(size, generator=torch.Generator().manual_seed(size * 10 + rank), dtype=torch.float64)
    reference = x.clone()
    dist.all_reduce(reference)
    results[size] = (demos.ring_all_reduce_by_hand(x.clone()), reference)
torch.save(results, os.path.join(sys.argv[3], f"ring_{rank}.pt"))
dist.destroy_process_group()
"""


def test_ring_function_on_awkward_sizes(tmp_path):
    """The ring function itself, on float64 random tensors of lengths that do not divide by 3 (and one
    shorter than the world size, so some chunks are empty), against a sum computed here."""
    world_size, sizes = 3, [1, 2, 5, 7, 1001, 12345]
    worker = tmp_path / "ring_worker.py"
    worker.write_text(RING_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", world_size,
           worker, REPO / SCRIPT, ",".join(map(str, sizes)), tmp_path]
    run(cmd, cwd=tmp_path)
    for rank in range(world_size):
        results = torch.load(tmp_path / f"ring_{rank}.pt")
        for size in sizes:
            expected = sum(torch.randn(size, generator=torch.Generator().manual_seed(size * 10 + r),
                                       dtype=torch.float64) for r in range(world_size))
            ring, reference = results[size]
            assert torch.allclose(ring, expected, rtol=1e-12, atol=1e-12), (rank, size)
            assert torch.allclose(ring, reference, rtol=1e-12, atol=1e-12), (rank, size)


def test_one_demo_only(tmp_path):
    """The README's `python 04_collectives_intro.py --world_size 4 --demo new_group`: that demo and no other."""
    proc = start_04(4, "spawn", tmp_path, "--demo", "new_group", "--log_file", "new_group.jsonl")
    (record,) = read_log(tmp_path / "new_group.jsonl")
    assert record["demo"] == "new_group" and record["after"] == [[1 + 3], [2 + 4], [1 + 3], [2 + 4]]
    assert proc.stdout.splitlines()[-1] == "[cpu:0] Finished training: 1 demo(s) on world_size 4"


def test_unknown_demo_and_world_size_one(tmp_path):
    proc = run([sys.executable, REPO / SCRIPT, "--demo", "nope"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "argument --demo: invalid choice: 'nope'" in proc.stderr.splitlines()[-1]

    proc = run([sys.executable, REPO / SCRIPT, "--world_size", "1"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith("error: --world_size must be at least 2: the collectives need "
                                                 "at least 2 processes (got 1)")

    proc = run(torchrun(1, SCRIPT), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert ("error: the collectives need at least 2 processes, got world size 1; "
            "e.g. torchrun --standalone --nproc-per-node 2 04_collectives_intro.py") in proc.stderr
    assert "Finished training" not in proc.stdout
