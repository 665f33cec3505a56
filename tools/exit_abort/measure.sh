#!/usr/bin/env bash
# The exit-abort table: each script on 2 processes, N runs, counted by tools/count_aborts.py.
#
#   bash tools/exit_abort/measure.sh REPO [natural|starved|strict] [RUNS_06] [RUNS_OTHERS]
#
# natural: the scripts as they are (the bar: 200 runs of 06 bf16, 50 of each other one).
# starved: with starve/sitecustomize.py, which makes a Gloo thread that outlives
# destroy_process_group() and still holds a Python tensor abort the process (FINDINGS.md): a few
# runs tell a repository with the teardown fix from one without. strict: starved, and a Gloo
# thread alive at exit fails the run (exit 86, counted as "other") whether or not it would abort.
# REPO: the checkout to run (a clone of an older commit gives the "before" rows). Prints one
# Markdown table; exit 1 if any run failed.
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
repo="$(cd "${1:?give the repository to run}" && pwd)"
mode="${2:-natural}"
runs06="${3:-200}"
runs="${4:-50}"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
if [ "$mode" = starved ] || [ "$mode" = strict ]; then
    export PYTHONPATH="$here/tools/exit_abort/starve${PYTHONPATH:+:$PYTHONPATH}"
    [ "$mode" = strict ] && export EXIT_ABORT_STRICT=1
elif [ "$mode" != natural ]; then
    echo "error: mode is natural, starved or strict, not '$mode'" >&2; exit 2
fi
export OMP_NUM_THREADS=1
tiny="model.n_layer=2 model.n_head=2 model.n_embd=32 model.block_size=32 trainer.batch_size=8
      trainer.eval_iters=2 trainer.eval_interval=10 trainer.max_iters=10
      trainer.fixed_global_batch=false trainer.grad_accum_steps=1 trainer.snapshot_path="
status=0
row() {  # label, runs, expected text, command...
    local label="$1" n="$2" expect="$3"; shift 3
    "$python" "$here/tools/count_aborts.py" --repo "$repo" --runs "$n" --expect "$expect" \
        --label "$label ($mode)" -- "$@" 2>/dev/null | tail -1 || status=1
}
echo "| command | runs | aborts | other failures | seconds |"
echo "|---|---|---|---|---|"
row "06_amp.py --dtype bf16" "$runs06" "Finished training" \
    torchrun --standalone --nproc-per-node 2 {repo}/06_amp.py --dtype bf16 --max_epochs 2
row "02_multigpu_mp_spawn.py (mp.spawn)" "$runs" "Finished training" \
    python {repo}/02_multigpu_mp_spawn.py --max_epochs 2
row "03_multigpu_torchrun.py" "$runs" "Finished training" \
    torchrun --standalone --nproc-per-node 2 {repo}/03_multigpu_torchrun.py --max_epochs 2
row "05_singlenode_cpu.py" "$runs" "Finished training" \
    torchrun --standalone --nproc-per-node 2 {repo}/05_singlenode_cpu.py --max_epochs 2
# shellcheck disable=SC2086  # the overrides are words
row "minGPT-ddp main.py" "$runs" "Finished training" \
    torchrun --standalone --nproc-per-node 2 {repo}/minGPT-ddp/main.py $tiny
exit $status
