#!/usr/bin/env bash
# Train step 03 (03_multigpu_torchrun.py) on several nodes of a Slurm cluster.
#
#   cd ddp-steps && sbatch slurm/sbatch_run.sh                   # 2 nodes, CPU or GPU: whatever they have
#   sbatch slurm/sbatch_run.sh --max_epochs 50 --save_every 10   # arguments after the script go to 03
#   sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 32 slurm/sbatch_run.sh   # 4 GPU nodes
#
# sbatch queues the job and returns at once; the job's output goes to slurm-JOBID.out in the
# directory you submitted from. Slurm runs this script once, on the first node of the job;
# `srun` below then starts one torchrun per node, and each torchrun starts the training
# processes of its node. The torchruns find each other through a rendezvous on the first node.
#
# Lines that start with #SBATCH are options for sbatch (bash sees comments). Options given on
# the sbatch command line win over them: `sbatch --nodes 4 slurm/sbatch_run.sh`.
#SBATCH --job-name=ddp-steps-03
# How many machines (nodes) the job gets.
#SBATCH --nodes=2
# One task per node: that task is torchrun, which starts the node's processes itself.
#SBATCH --ntasks-per-node=1
# Cores for that one task, shared by all the processes torchrun starts on the node:
# at least NPROC_PER_NODE on CPU nodes; on GPU nodes give it several per GPU (e.g. 32 for 8 GPUs).
#SBATCH --cpus-per-task=2
# GPUs per node. Off by default, so the script also runs on CPU-only clusters (and on
# slurm/local_cluster.sh); on a GPU cluster ask for them on the command line,
# `sbatch --gpus-per-node 8 slurm/sbatch_run.sh`, or delete one '#' below.
##SBATCH --gpus-per-node=8
# Wall-clock limit: Slurm ends the job after this long (hours:minutes:seconds).
#SBATCH --time=01:00:00
# Where stdout and stderr go (%j: the job id), relative to the job's working directory.
#SBATCH --output=slurm-%j.out
#
# Environment variables that change what it does (set them in front of sbatch: sbatch takes
# your environment along to the job, e.g. `DEVICE=cpu NPROC_PER_NODE=4 sbatch slurm/sbatch_run.sh`):
#   DEVICE          gpu, cpu or auto (default): auto uses GPUs if the job was given some (--gpus-per-node)
#   NPROC_PER_NODE  processes per node; default: one per GPU the job has on a node, or 2 on CPU
#   OMP_NUM_THREADS threads per process on CPU (default 1)
#   RDZV_HOST       address of the rendezvous (default: the first node's address, from Slurm)
#   RDZV_PORT       its port (default 20000 + job id % 12000: jobs running at once never share one)
#   LOCAL_ADDR      the address torchrun tells the other nodes to reach this node at
#                   (default: its hostname). One value for all nodes, so it only makes sense
#                   where all "nodes" are one machine: 127.0.0.1, the default when the
#                   rendezvous is on 127.0.0.1 (as on slurm/local_cluster.sh)
#   MAX_RESTARTS    torchrun --max-restarts: restart all processes this often after a crash (default 0)
#   DDP_STEPS_DIR   the repository (default: the directory you submitted from)
#   TRAIN_SCRIPT    the script to train, relative to the repository (default 03_multigpu_torchrun.py)

# Stop at the first failing command (-e), on unset variables (-u) and on failures inside pipes.
set -euo pipefail
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "error: this is a Slurm batch script: submit it with sbatch (sbatch slurm/sbatch_run.sh)" >&2
    exit 1
fi

# sbatch ran this script from a copy in Slurm's spool directory, so the script's own location
# says nothing: find the repository through the directory sbatch was called from.
REPO="${DDP_STEPS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
# The training script, relative to the repository: step 03 unless TRAIN_SCRIPT says otherwise
# (minGPT-ddp/slurm/sbatch_run.sh sets it to minGPT-ddp/main.py and hands over to this file).
SCRIPT="$REPO/${TRAIN_SCRIPT:-03_multigpu_torchrun.py}"
if [[ ! -f "$SCRIPT" ]]; then
    echo "error: $SCRIPT not found: submit from the repository root (cd ddp-steps; sbatch slurm/sbatch_run.sh)" \
         "or set DDP_STEPS_DIR=/path/to/ddp-steps" >&2
    exit 1
fi
# The virtualenv that `make` creates, if there is one: its bin/ holds python and torchrun.
# (The path must be the same on every node: the repository on a shared file system.)
if [[ -x "$REPO/.venv/bin/torchrun" ]]; then
    export PATH="$REPO/.venv/bin:$PATH"
fi
command -v torchrun >/dev/null || { echo "error: torchrun not found: run 'make install' or activate a Python with PyTorch" >&2; exit 1; }

# The job's nodes: SLURM_JOB_NODELIST is compressed ("gpu[01-02]"), scontrol expands it.
# The first node hosts the rendezvous. Its address is the one Slurm itself reaches it at
# (NodeAddr; the same as the name on most clusters).
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
HEAD_ADDR=$(scontrol show node "$HEAD" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1 || true)
RDZV_HOST="${RDZV_HOST:-${HEAD_ADDR:-$HEAD}}"
# A port from the job id: two jobs running at the same time, even on the same first node,
# never meet in each other's rendezvous. 20000-31999: below Linux's ephemeral ports (32768 and
# up), which the system hands out to outgoing connections and could have given away already.
RDZV_PORT="${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 12000))}"
if [[ -z "${LOCAL_ADDR:-}" && "$RDZV_HOST" == 127.* ]]; then
    LOCAL_ADDR=127.0.0.1
fi

# GPUs this job was given on a node: Slurm says so in SLURM_GPUS_ON_NODE (or lists them in
# CUDA_VISIBLE_DEVICES). Not nvidia-smi: it also sees a node's GPUs that other jobs were given.
JOB_GPUS="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$JOB_GPUS" && -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]]; then
    JOB_GPUS=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
JOB_GPUS="${JOB_GPUS:-0}"
DEVICE="${DEVICE:-auto}"
if [[ "$DEVICE" == auto ]]; then
    if (( JOB_GPUS > 0 )); then DEVICE=gpu; else DEVICE=cpu; fi
fi
case "$DEVICE" in
    # One process per GPU of the job; with DEVICE=gpu but no GPUs from Slurm, torchrun's "gpu": one per GPU it sees.
    gpu) NPROC="${NPROC_PER_NODE:-$JOB_GPUS}"
         [[ "$NPROC" != 0 ]] || NPROC=gpu ;;
    cpu) NPROC="${NPROC_PER_NODE:-2}"
         export CUDA_VISIBLE_DEVICES=""  # hide any GPU: the script then uses the CPU and gloo
         export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ;;
    *) echo "error: DEVICE must be gpu, cpu or auto, not '$DEVICE'" >&2; exit 1 ;;
esac
# The node's processes share --cpus-per-task cores (data loading, the Python of each rank): fewer
# cores than processes still runs, slowly.
CORES="${SLURM_CPUS_PER_TASK:-1}"
if [[ "$NPROC" =~ ^[0-9]+$ ]] && (( CORES < NPROC )); then
    echo "warning: $NPROC processes per node share $CORES core(s) (--cpus-per-task $CORES): expect it slow;" \
         "ask for more, e.g. sbatch --cpus-per-task $(( NPROC * 4 ))" >&2
fi

echo "job $SLURM_JOB_ID | nodes $SLURM_JOB_NODELIST ($SLURM_JOB_NUM_NODES) | rendezvous $RDZV_HOST:$RDZV_PORT" \
     "| device $DEVICE | processes per node $NPROC | working directory $PWD"

# srun starts one task per node (the torchrun line below) on all the job's nodes at once.
#   --cpus-per-task: srun does not take it from sbatch by itself (Slurm 22.05 and later)
#   --kill-on-bad-exit=1: if one node's torchrun fails, end the others instead of letting them wait
#   --gpus-per-node: the GPUs you asked sbatch for (sbatch --gpus-per-node N), handed on to the step
#     explicitly (only when you asked: SLURM_GPUS_PER_NODE is unset otherwise)
# torchrun:
#   --nnodes: how many torchruns must meet before training starts
#   --rdzv-backend c10d: the rendezvous is a small key-value store that the torchrun on the
#     rendezvous host serves; --rdzv-endpoint says where, --rdzv-id tells this job's torchruns apart
#   --local-addr: the address this node's torchrun gives the others (only where set)
# "$@": the arguments you gave after the script's name on the sbatch line.
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
     --kill-on-bad-exit=1 ${SLURM_GPUS_PER_NODE:+--gpus-per-node="$SLURM_GPUS_PER_NODE"} \
    torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC" \
        --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \
        ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} --max-restarts "${MAX_RESTARTS:-0}" \
        "$SCRIPT" "$@"
