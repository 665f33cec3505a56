"""Step 04: every collective demo, checked value by value from its JSON log, for several world sizes.

One run of the script per world size covers its demos (starting processes is what costs time): 2 processes
run the default (the teacher's path), 3 and 4 run `--demo all`. The expected values are worked out here from
the documented semantics of each primitive, not taken from the script. Every run is Gloo on the CPU with
PyTorch 2.13, so each assertion states what happens there: no "native or fallback" alternatives.
"""
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, load_script, run, torchrun

SCRIPT = "04_collectives_intro.py"
SMALL = ["--bench_mb", "0.25", "--bench_iters", "2", "--manual_steps", "3"]
CORE = ["send_recv", "broadcast", "all_reduce", "all_gather", "reduce_scatter", "all_to_all_single",
        "ring_all_reduce", "manual_ddp"]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_04(world_size, how, tmp_path, *args, check=True):
    """Run step 04 the way the README says: torchrun, or plain python (mp.spawn) with --world_size."""
    if how == "torchrun":
        cmd = torchrun(world_size, SCRIPT, *args)
    else:
        cmd = [sys.executable, REPO / SCRIPT, "--world_size", world_size, *args]
    return run(cmd, cwd=tmp_path, check=check)


def by_demo(path):
    records = {}
    for record in read_log(path):
        records.setdefault(record["demo"], []).append(record)
    return records


# world size 2: the README's command (the default demos, spawned); 3: every demo with --cpu, spawned;
# 4: every demo under torchrun. 3 and 4 with small benchmark and training settings.
RUNS = {2: ("spawn", []), 3: ("spawn", ["--demo", "all", "--cpu", *SMALL]), 4: ("torchrun", ["--demo", "all", *SMALL])}


@pytest.fixture(scope="module", params=sorted(RUNS), ids=lambda n: f"world{n}-{RUNS[n][0]}")
def full_run(request, tmp_path_factory):
    """(world_size, stdout, {demo: [log records]}) for one run."""
    world_size = request.param
    how, settings = RUNS[world_size]
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


def needs_extras(n):
    if n == 2:
        pytest.skip("the default run (world size 2) has only the teacher's path")


def test_output_first_and_last_lines_and_demos_logged(full_run):
    n, stdout, by_demo = full_run
    lines = stdout.splitlines()
    why = "(--cpu: using the CPU)" if n == 3 else f"(no GPU for {n} processes: using the CPU)"
    assert lines[0] == f"[cpu:0] device cpu | backend gloo | world_size {n} | {why}"
    # It trains nothing worth the name, so it must not say so; its last line says what ran.
    assert "Finished training" not in stdout
    if n == 2:
        assert lines[-1] == "[cpu:0] Done: 8 of 11 demos on world_size 2 (the other 3: --demo all, or --demo NAME)"
        assert list(by_demo) == CORE
    else:
        assert lines[-1] == f"[cpu:0] Done: 11 of 11 demos on world_size {n}"
        assert list(by_demo) == ["send_recv", "broadcast", "all_reduce", "all_gather", "reduce_scatter",
                                 "all_to_all_single", "barrier", "new_group", "ring_all_reduce", "ring_bandwidth",
                                 "manual_ddp"]  # --demo all: lesson order
    # Rank 0 prints every rank's row, in rank order, once per table (all_reduce has two; ring_bandwidth none).
    rows = [line for line in lines if line.startswith("[cpu:0]     rank ")]
    ranks = [int(line.split()[2].rstrip(":")) for line in rows]
    tables = 9 if n == 2 else 11
    assert len(rows) == tables * n and ranks == list(range(n)) * tables


def test_point_to_point(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "send_recv", n)
    assert before == [[1, 2, 3, 4]] + [[0, 0, 0, 0]] * (n - 1)
    assert after == [[1, 2, 3, 4], [1, 2, 3, 4]] + [[0, 0, 0, 0]] * (n - 2)  # only rank 1 received


def test_broadcast_and_all_reduce(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "broadcast", n)
    assert before == [labelled(r, 4) for r in range(n)]
    assert after == [before[0]] * n

    inputs = np.array([[r + 1, n - r, 10 * (r + 1), 10 * (n - r)] for r in range(n)], dtype=np.float64)
    records = by_demo["all_reduce"]
    assert [r["op"] for r in records] == ["SUM", "MAX"]
    for record, expected in zip(records, (inputs.sum(0), inputs.max(0))):
        assert record["before"] == inputs.tolist()
        assert record["after"] == [expected.tolist()] * n, record  # small integers: exact


def test_all_gather_and_reduce_scatter(full_run):
    n, _, by_demo = full_run
    before, after = one(by_demo, "all_gather", n)
    assert before == [labelled(r, 2) for r in range(n)]
    assert after == [sum((labelled(r, 2) for r in range(n)), [])] * n

    (record,) = by_demo["reduce_scatter"]
    pieces = np.array([[(r + 1) * (k + 1) for k in range(2 * n)] for r in range(n)], dtype=np.float64)
    assert record["before"] == pieces.tolist()
    total = pieces.sum(0)
    assert record["after"] == [total[2 * r:2 * r + 2].tolist() for r in range(n)]
    assert record["method"] == "native"  # Gloo has reduce_scatter since PyTorch 2.8: the fallback must not run


def test_all_to_all_single_values(full_run):
    """Rank i sends its piece j to rank j: rank j ends with piece j of every rank, in rank order (a transpose)."""
    n, _, by_demo = full_run
    before, after = one(by_demo, "all_to_all_single", n)
    assert before == [labelled(r, n) for r in range(n)]
    assert after == [[10.0 * (s + 1) + j for s in range(n)] for j in range(n)]
    spelled_out = {2: [[10, 20], [11, 21]], 3: [[10, 20, 30], [11, 21, 31], [12, 22, 32]]}
    assert after == spelled_out.get(n, after)


def test_barrier_and_subgroups(full_run):
    n, _, by_demo = full_run
    needs_extras(n)
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
    # a random tensor whose length does not divide by the world size: the same as dist.all_reduce
    assert summary["random_size"] % n
    assert summary["matches_all_reduce"] is True and summary["max_abs_diff"] < 1e-4


def test_ring_bandwidth(full_run):
    n, stdout, by_demo = full_run
    needs_extras(n)
    (bench,) = by_demo["ring_bandwidth"]
    assert (bench["bytes"], bench["iterations"]) == (0.25 * 2**20, 2)
    for key in ("ring_s", "all_reduce_s", "ring_busbw_GBps", "all_reduce_busbw_GBps"):
        assert math.isfinite(bench[key]) and bench[key] > 0
    assert bench["ring_busbw_GBps"] == pytest.approx(bench["bytes"] * 2 * (n - 1) / n / bench["ring_s"] / 1e9)
    assert f"--- ring_bandwidth: 0.2 MiB float32, 2 iterations: ring by hand {bench['ring_s'] * 1e3:.2f} ms" in stdout


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
results = {}
for size in [int(s) for s in sys.argv[2].split(",")]:
    x = torch.randn(size, generator=torch.Generator().manual_seed(size * 10 + rank), dtype=torch.float64)
    reference = x.clone()
    dist.all_reduce(reference)
    results[size] = (step04.ring_all_reduce_by_hand(x.clone()), reference)
torch.save(results, os.path.join(sys.argv[3], f"ring_{rank}.pt"))
dist.barrier()
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


def test_demo_selection(tmp_path):
    """--demo is repeatable and takes comma lists; the demos run in the order given, each once."""
    proc = start_04(2, "spawn", tmp_path, "--demo", "all_to_all_single,barrier", "--demo", "all_to_all_single",
                    "--demo", "broadcast", "--log_file", "chosen.jsonl")
    assert [r["demo"] for r in read_log(tmp_path / "chosen.jsonl")] == ["all_to_all_single", "barrier", "broadcast"]
    tables = [line.split()[2].split(":")[0].split("(")[0] for line in proc.stdout.splitlines() if " --- " in line]
    assert tables == ["all_to_all_single", "barrier", "broadcast"]
    assert proc.stdout.splitlines()[-1] == (
        "[cpu:0] Done: 3 of 11 demos on world_size 2 (the other 8: --demo all, or --demo NAME)")


def test_plan_devices_with_faked_gpu_counts():
    """GPUs only when there is one per process on the node; otherwise every process on the CPU, saying why."""
    step04 = load_script(SCRIPT)
    plan = step04.plan_devices
    assert plan(2, 0, False) == ("cpu", "gloo", "(no GPU for 2 processes: using the CPU)")
    assert plan(2, 1, False) == ("cpu", "gloo", "(1 GPU for 2 processes: using the CPU)")
    assert plan(4, 4, False) == ("cuda", "nccl", "(one GPU per process)")
    assert plan(2, 4, False) == ("cuda", "nccl", "(one GPU per process)")
    assert plan(8, 4, False) == ("cpu", "gloo", "(4 GPUs for 8 processes: using the CPU)")
    assert plan(2, 2, False, "xpu") == ("xpu", "xccl", "(one GPU per process)")
    for gpus in (0, 1, 4):
        assert plan(2, gpus, True) == ("cpu", "gloo", "(--cpu: using the CPU)")


def test_bad_input_one_line_exit_2(tmp_path):
    for args, message in [
        (["--demo", "nope"], "error: --demo: unknown demo 'nope'; choose from all, send_recv, broadcast, "),
        (["--demo", "broadcast,nope"], "error: --demo: unknown demo 'nope'"),
        (["--world_size", "1"], "error: world size 1: every demo passes data between processes; start at least 2"),
        (["--timeout_min", "0"], "error: --timeout_min must be positive"),
        (["--bench_iters", "0"], "error: --bench_iters must be positive"),
    ]:
        proc = run([sys.executable, REPO / SCRIPT, *args], cwd=tmp_path, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr.splitlines()[-1], (args, proc.stderr)
        assert "Traceback" not in proc.stderr

    proc = run(torchrun(1, SCRIPT), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "error: world size 1: every demo passes data between processes; start at least 2" in proc.stderr
    assert proc.stdout == ""
