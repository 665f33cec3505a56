#!/usr/bin/env bash
# Train minGPT-ddp (minGPT-ddp/main.py) on several nodes of a Slurm cluster.
#
#   cd ddp-steps && sbatch minGPT-ddp/slurm/sbatch_run.sh         # 2 nodes, CPU or GPU: whatever they have
#   sbatch minGPT-ddp/slurm/sbatch_run.sh trainer.max_iters=2000 model.n_layer=6   # key=value go to main.py
#   sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 32 minGPT-ddp/slurm/sbatch_run.sh \
#       config=minGPT-ddp/gpt2_train_cfg.yaml trainer.grad_accum_steps=32 trainer.batch_size=16
#                                    # 4 GPU nodes, the 8-layer model: 32 GPUs share its 65,536-token step
#
# main.py's default config is cpu_cfg.yaml without a GPU, gpt2_train_cfg.yaml with one. It
# writes its snapshot and metrics to runs/mingpt/ under the job's working directory (the
# directory you submitted from, or sbatch --chdir DIR), unless trainer.snapshot_path=... and
# trainer.log_file=... say otherwise. It passes trainer.resume=auto before your arguments: a
# restart (MAX_RESTARTS) or a resubmission continues from that snapshot, or starts afresh when
# there is none; the way to survive a crash or train longer than --time allows. To start over
# although a snapshot exists, add trainer.resume=false (your arguments win).
#
# Everything but the training script is slurm/sbatch_run.sh's (step 03's launcher): this file
# holds sbatch's options, finds the repository and hands over to it with TRAIN_SCRIPT set.
# Read that file for what each line does; its environment variables (DEVICE, NPROC_PER_NODE,
# OMP_NUM_THREADS, RDZV_HOST, RDZV_PORT, LOCAL_ADDR, MAX_RESTARTS) work here too.
#
# Lines that start with #SBATCH are options for sbatch (bash sees comments); options given on
# the sbatch command line win over them: `sbatch --nodes 4 minGPT-ddp/slurm/sbatch_run.sh`.
#SBATCH --job-name=mingpt-ddp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
##SBATCH --gpus-per-node=8
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out

set -euo pipefail
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "error: this is a Slurm batch script: submit it with sbatch (sbatch minGPT-ddp/slurm/sbatch_run.sh)" >&2
    exit 1
fi
# sbatch runs a copy of this file from Slurm's spool directory: find the repository through the
# directory sbatch was called from (the repository root, or minGPT-ddp/ inside it).
SUBMIT_DIR="${SLURM_SUBMIT_DIR:-$PWD}"
if [[ -z "${DDP_STEPS_DIR:-}" && ! -f "$SUBMIT_DIR/minGPT-ddp/main.py" && -f "$SUBMIT_DIR/main.py" ]]; then
    DDP_STEPS_DIR="$(dirname "$SUBMIT_DIR")"  # submitted from inside minGPT-ddp/
fi
export DDP_STEPS_DIR="${DDP_STEPS_DIR:-$SUBMIT_DIR}"
if [[ ! -f "$DDP_STEPS_DIR/slurm/sbatch_run.sh" ]]; then
    echo "error: $DDP_STEPS_DIR/slurm/sbatch_run.sh not found: submit from the repository root" \
         "(cd ddp-steps; sbatch minGPT-ddp/slurm/sbatch_run.sh) or set DDP_STEPS_DIR=/path/to/ddp-steps" >&2
    exit 1
fi
# "$@": the arguments after the script's name on the sbatch line (config=..., key=value) go to main.py,
# after trainer.resume=auto (the last value of a key wins).
export TRAIN_SCRIPT="${TRAIN_SCRIPT:-minGPT-ddp/main.py}"  # tests set it to a fault-injecting wrapper of main.py
exec bash "$DDP_STEPS_DIR/slurm/sbatch_run.sh" trainer.resume=auto "$@"
