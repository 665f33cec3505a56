"""Step 04: every demo's values, from its JSON log, against the values worked out here from what
each primitive is documented to do (not taken from the script).

One run serves the tests: the README's `--demo all` on 3 processes (an odd world size: the
ring's chunks differ in length), through tests/workers/collectives_extra.py, which adds two
checks on the same ranks after the last demo: the ring on awkward lengths, and reduce_scatter's
fallback next to the native collective (the fallback never runs otherwise on PyTorch 2.8+).
Argument checks and the device plan need no process: in this process.
"""
import json
import shlex
import sys

import numpy as np
import pytest
import torch

import steptools
from conftest import REPO, exit_checked_env, load_script, run

README_COMMAND = "torchrun --standalone --nproc-per-node 3 04_collectives_intro.py --demo all"
SMALL = ["--bench_mb", "0.25", "--bench_iters", "2", "--manual_steps", "3"]
N = 3
ALL = ["send_recv", "broadcast", "all_reduce", "all_gather", "reduce_scatter",
       "all_to_all_single", "barrier", "new_group", "ring_all_reduce", "ring_bandwidth",
       "manual_ddp"]


@pytest.fixture(scope="module")
def step04():
    return load_script("04_collectives_intro.py")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """(folder, stdout, {demo: [log records]})."""
    folder = tmp_path_factory.mktemp("step04")
    words = shlex.split(README_COMMAND)
    worker = REPO / "tests" / "workers" / "collectives_extra.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:-3], worker, *words[-2:],
           *SMALL, "--log_file", "collectives.jsonl"]
    assert words[-3] == "04_collectives_intro.py"
    done = run(cmd, cwd=folder, timeout=steptools.LAUNCH_TIMEOUT_S, env=exit_checked_env())
    records = {}
    for line in (folder / "collectives.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["demo"], []).append(record)
    return folder, done.stdout, records


def one(records, name):
    (record,) = records[name]
    assert record["world_size"] == N
    return record["before"], record["after"]


def labelled(rank, n):
    """The demos' per-rank tensors: rank r holds 10*(r+1) + [0, 1, ..., n-1]."""
    return [10.0 * (rank + 1) + i for i in range(n)]


def test_output_lines(readme_run):
    _, stdout, records = readme_run
    lines = stdout.splitlines()
    assert lines[0] == ("[cpu rank 0] device cpu | backend gloo | world_size 3 | (no GPU for 3 "
                        "processes: using the CPU)")
    assert lines[-1] == "[cpu rank 0] Done: 11 of 11 demos on world_size 3"
    assert list(records) == ALL  # --demo all: the lesson's order
    # Rank 0 prints every rank's row, in rank order, once per table (all_reduce has two tables,
    # ring_bandwidth none); no other rank prints.
    rows = [line for line in lines if line.startswith("[cpu rank 0]     rank ")]
    assert [int(line.split()[4].rstrip(":")) for line in rows] == list(range(N)) * 11
    assert all(line.startswith("[cpu rank 0] ") for line in lines)
    assert "Finished training" not in stdout  # it trains nothing worth the name


def test_point_to_point(readme_run):
    before, after = one(readme_run[2], "send_recv")
    assert before == [[1, 2, 3, 4]] + [[0, 0, 0, 0]] * (N - 1)
    assert after == [[1, 2, 3, 4], [1, 2, 3, 4]] + [[0, 0, 0, 0]] * (N - 2)  # rank 1 alone


def test_broadcast_and_all_reduce(readme_run):
    records = readme_run[2]
    before, after = one(records, "broadcast")
    assert before == [labelled(r, 4) for r in range(N)]
    assert after == [before[0]] * N
    inputs = np.array([[r + 1, N - r, 10 * (r + 1), 10 * (N - r)] for r in range(N)], dtype=float)
    assert [r["op"] for r in records["all_reduce"]] == ["SUM", "MAX"]
    for record, expected in zip(records["all_reduce"], (inputs.sum(0), inputs.max(0))):
        assert record["before"] == inputs.tolist()
        assert record["after"] == [expected.tolist()] * N  # small integers: exact


def test_all_gather_and_reduce_scatter(readme_run):
    records = readme_run[2]
    before, after = one(records, "all_gather")
    assert before == [labelled(r, 2) for r in range(N)]
    assert after == [sum((labelled(r, 2) for r in range(N)), [])] * N
    (record,) = records["reduce_scatter"]
    pieces = np.array([[(r + 1) * (k + 1) for k in range(2 * N)] for r in range(N)], dtype=float)
    assert record["before"] == pieces.tolist()
    total = pieces.sum(0)
    assert record["after"] == [total[2 * r:2 * r + 2].tolist() for r in range(N)]
    assert record["method"] == "native"  # Gloo has reduce_scatter since PyTorch 2.8


def test_reduce_scatter_fallback_keeps_each_ranks_own_piece(readme_run):
    """The fallback (all_reduce everything, keep your piece) against the native collective on
    the same ranks. Kills: the fallback keeping another rank's piece."""
    folder = readme_run[0]
    total = np.array([[(r + 1) * (k + 1) for k in range(2 * N)] for r in range(N)]).sum(0)
    for rank in range(N):
        results = torch.load(folder / f"extra_{rank}.pt", weights_only=True)
        assert results["fallback"].tolist() == total[2 * rank:2 * rank + 2].tolist(), rank
        assert torch.equal(results["fallback"], results["native"])


def test_all_to_all_single_is_a_transpose(readme_run):
    before, after = one(readme_run[2], "all_to_all_single")
    assert before == [labelled(r, N) for r in range(N)]
    assert after == [[10.0 * (s + 1) + j for s in range(N)] for j in range(N)]


def test_subgroups(readme_run):
    before, after = one(readme_run[2], "new_group")
    assert before == [[r + 1] for r in range(N)]
    assert after == [[sum(q + 1 for q in range(r % 2, N, 2))] for r in range(N)]


def test_ring_all_reduce_steps(readme_run):
    """The ring by hand: chunked reduce-scatter then all-gather, N-1 steps each, on 2N+1 values.
    Kills: a chunk index off by one in either phase."""
    records = readme_run[2]["ring_all_reduce"]
    (summary,) = [r for r in records if "phase" not in r]
    steps = [r for r in records if "phase" in r]
    assert [(r["phase"], r["step"]) for r in steps] == (
        [("reduce_scatter", k) for k in range(1, N)] + [("all_gather", k) for k in range(1, N)])
    start = np.array(summary["before"], dtype=float)
    total = start.sum(0)
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(total, N)])  # as tensor_split cuts
    after_reduce_scatter = np.array(steps[N - 2]["state"])
    for r in range(N):  # then rank r owns the full sum of chunk r+1
        c = (r + 1) % N
        assert (after_reduce_scatter[r, bounds[c]:bounds[c + 1]].tolist()
                == total[bounds[c]:bounds[c + 1]].tolist()), r
    assert steps[-1]["state"] == summary["after"] == [total.tolist()] * N


def test_ring_function_on_awkward_lengths(readme_run):
    """float64 tensors of lengths that do not divide by 3, two of them shorter than the world
    size (empty chunks), against sums computed here."""
    folder = readme_run[0]
    for rank in range(N):
        results = torch.load(folder / f"extra_{rank}.pt", weights_only=True)["ring"]
        for size, ring in results.items():
            expected = sum(torch.randn(size, dtype=torch.float64, generator=torch.Generator()
                                       .manual_seed(size * 10 + r)) for r in range(N))
            # float64 sums of 3 numbers in another order: equal to rounding (1e-15 relative)
            assert torch.allclose(ring, expected, rtol=1e-12, atol=1e-12), (rank, size)


def test_ring_bandwidth_reports_both(readme_run):
    (bench,) = readme_run[2]["ring_bandwidth"]
    assert (bench["bytes"], bench["iterations"]) == (0.25 * 2**20, 2)
    for key in ("ring_s", "all_reduce_s", "ring_busbw_GBps", "all_reduce_busbw_GBps"):
        assert np.isfinite(bench[key]) and bench[key] > 0


def test_manual_gradient_averaging_matches_ddp(readme_run):
    (record,) = readme_run[2]["manual_ddp"]
    before, after = record["before"], record["after"]
    assert before == [before[0]] * N and after == [after[0]] * N  # all copies stay identical
    assert not np.allclose(before[0], after[0])  # and they did train
    # The DDP-wrapped copy: the same sums of the same gradients, in buckets (rounding only)
    assert np.allclose(record["ddp_after"], after, rtol=0, atol=1e-6)


def test_plan_devices_with_faked_gpu_counts(step04):
    """GPUs only when there is one per process on the node; else every process on the CPU,
    saying why."""
    plan = step04.plan_devices
    assert plan(2, 0, False) == ("cpu", "gloo", "(no GPU for 2 processes: using the CPU)")
    assert plan(2, 1, False) == ("cpu", "gloo", "(1 GPU for 2 processes: using the CPU)")
    assert plan(4, 4, False) == ("cuda", "nccl", "(one GPU per process)")
    assert plan(2, 4, False) == ("cuda", "nccl", "(one GPU per process)")
    assert plan(8, 4, False) == ("cpu", "gloo", "(4 GPUs for 8 processes: using the CPU)")
    assert plan(2, 2, False, "xpu") == ("xpu", "xccl", "(one GPU per process)")
    for gpus in (0, 1, 4):
        assert plan(2, gpus, True) == ("cpu", "gloo", "(--cpu: using the CPU)")


def test_demo_selection(step04, monkeypatch):
    """--demo is repeatable and takes comma lists; the demos run in the order given, each once."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = step04.parse_args(["--demo", "all_to_all_single,barrier", "--demo", "all_to_all_single",
                              "--demo", "broadcast"])
    assert args.demo == ["all_to_all_single", "barrier", "broadcast"]
    assert step04.parse_args([]).demo == ALL[:6] + ["ring_all_reduce", "manual_ddp"]
    assert step04.parse_args(["--demo", "barrier", "--demo", "all"]).demo == ALL


@pytest.mark.parametrize("argv,env,message", [
    (["--demo", "nope"], {}, "error: --demo: unknown demo 'nope'; choose from all, send_recv, "),
    (["--demo", "broadcast,nope"], {}, "error: --demo: unknown demo 'nope'"),
    (["--world_size", "1"], {}, "error: world size 1: every demo passes data between processes"),
    ([], {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "error: world size 1: every demo passes data"),
    (["--timeout_min", "0"], {}, "error: --timeout_min must be positive"),
    (["--bench_iters", "0"], {}, "error: --bench_iters must be positive"),
])
def test_bad_input_one_line_exit_2(step04, monkeypatch, capsys, argv, env, message):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        step04.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
