#!/usr/bin/env bash
# Thin torchrun wrapper (torchtitan style): rendezvous on localhost, rank-0 logs on the console, every rank's
# stdout/stderr teed into torchrun's log dir.
#   NGPU=2 CONFIG=configs/cpu_default.toml launch/train.sh [--set train.steps=5 ...]
# NGPU: processes on this node (GPUs, or CPU processes); LOG_RANK: local ranks shown (e.g. 0,1).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
LOG_RANK=${LOG_RANK:-0}
CONFIG=${CONFIG:-configs/cpu_default.toml}
exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend=c10d --rdzv_endpoint=localhost:0 \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m fsdp4bit.train --config "${CONFIG}" "$@"
