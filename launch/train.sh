#!/usr/bin/env bash
# Thin torchrun wrapper (torchtitan style): rendezvous on localhost, rank-0 logs on the console, every rank's
# stdout/stderr teed into torchrun's log dir.
#   NGPU=2 CONFIG=configs/cpu_default.toml launch/train.sh [--set train.steps=5 ...]
# NGPU: processes on this node (GPUs, or CPU processes); LOG_RANK: local ranks shown (e.g. 0,1).
# CONFIG: a path from the current folder, else from the repository root (where the run starts).
# PET_SIGNALS_TO_HANDLE: the signals torchrun forwards to its workers (its default and SLURM's SIGUSR1/SIGUSR2, so a
# run listing them in checkpoint.save_on_signals gets them; torchrun alone would die of SIGUSR1 and leave its workers).
set -euo pipefail
NGPU=${NGPU:-2}
LOG_RANK=${LOG_RANK:-0}
CONFIG=${CONFIG:-configs/cpu_default.toml}
CALLER_DIR=${PWD}
if [[ "${CONFIG}" != /* && -f "${CONFIG}" ]]; then
    CONFIG="${CALLER_DIR}/${CONFIG}"
fi
cd "$(dirname "$0")/.."
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
if ! [[ "${NGPU}" =~ ^[1-9][0-9]*$ || "${NGPU}" =~ ^(auto|cpu|gpu|xpu)$ ]]; then
    echo "launch/train.sh: NGPU must be a process count of 1 or more (or auto, cpu, gpu, xpu), got '${NGPU}'" >&2
    exit 2
fi
if [[ ! -f "${CONFIG}" ]]; then
    echo "launch/train.sh: CONFIG file not found: ${CONFIG} (looked in ${CALLER_DIR} and ${PWD})" >&2
    exit 2
fi
exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend=c10d --rdzv_endpoint=localhost:0 \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m fsdp4bit.train --config "${CONFIG}" "$@"
