#!/usr/bin/env bash
# Distributed training on one or more nodes with torchrun.
#
#   bash tools/dist_train.sh CONFIG GPUS [train.py arguments]
#
# GPUS processes per node (one per GPU; without CUDA they run on the CPU
# with the gloo backend, see tools/train.py). Multi-node: set NNODES,
# NODE_RANK, MASTER_ADDR and PORT on every node. PYTHON selects the
# interpreter (default: python).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG GPUS [train.py arguments]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# `python -m torch.distributed.run` is torchrun, with this interpreter
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$ROOT/tools/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
