#!/usr/bin/env bash
# The main job: from a fresh checkout to a trained, evaluated and pictured
# token-pruned detector, on the CPU, in a few minutes.
#
#   1. install what is missing (tools/install.sh, idempotent);
#   2. generate the synthetic COCO-format set of shapes (deterministic; kept
#      if it is already there);
#   3. train the 'paper'-pruned PlainMamba-L1 + ViT-Adapter Mask R-CNN on it
#      (resumes an interrupted run; a finished run is kept);
#   4. evaluate the last checkpoint with the COCO metric (bbox + segm) and
#      write the metrics to a JSON file;
#   5. draw one validation image with its predicted boxes and masks beside
#      the maps of the tokens pruned at each pruning step;
#   6. print where the checkpoint, the metrics and the picture are.
#
# Usage: bash tools/main_job.sh [--fresh]
#   --fresh  delete the work directory first (train again from scratch)
#
# Environment:
#   MMSSM_WORK_DIR   work directory (default: <repo>/work_dirs/main_job)
#   OMP_NUM_THREADS  torch threads; by default the idle cores (a busy
#                    machine makes threads of one process wait for each
#                    other, which is much slower than using fewer)
#   and those of tools/install.sh (MMSSM_VENV, MMSSM_WHEEL_CACHE, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MMSSM_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CONFIG=configs/mask_rcnn/mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-synthetic_coco-shapes.py
WORK_DIR="${MMSSM_WORK_DIR:-$ROOT/work_dirs/main_job}"
# must match data_root of $CONFIG (and its docstring)
DATA=data/synthetic/shapes-128
NUM_TRAIN=400
NUM_VAL=50
SIZE=128
SEED=0
# the validation image of the picture
IMAGE="$DATA/val/000000.png"

FRESH=0
for arg in "$@"; do
  case "$arg" in
    --fresh) FRESH=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "[main job] unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

STEP=''
T0=$SECONDS
T_STEP=$SECONDS
TIMES=()
step() {
  if [ -n "$STEP" ]; then
    TIMES+=("$(printf '%-10s %4d s' "$STEP" $((SECONDS - T_STEP)))")
  fi
  STEP="$1"
  T_STEP=$SECONDS
  echo
  echo "[main job] ===== $1: $2"
}
trap 'echo "[main job] FAILED at step: $STEP (see the messages above)" >&2' ERR

step install 'install what is missing (tools/install.sh)'
bash tools/install.sh

# the cores this process may run on (its CPU affinity: a container's or
# taskset's limit), not nproc, which obeys OMP_NUM_THREADS
CORES=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  # the usable cores that other processes leave idle, measured over one
  # second while this job runs nothing (the load average would count the
  # install step this job just ran); at least 1
  OMP_NUM_THREADS=$("$PY" - <<'PY'
import os, time
cores = sorted(os.sched_getaffinity(0))
def ticks():
    out = {}
    with open('/proc/stat') as f:
        for line in f:
            name, *values = line.split()
            if name[:3] == 'cpu' and name[3:].isdigit():
                v = list(map(int, values))
                out[int(name[3:])] = (v[3] + v[4], sum(v[:8]))  # idle, all
    return out
a = ticks(); time.sleep(1); b = ticks()
idle = sum((b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in cores)
print(max(1, min(len(cores), int(idle + 0.25))))
PY
)
fi
export OMP_NUM_THREADS
echo "[main job] torch threads: $OMP_NUM_THREADS of $CORES usable cores"

step data "synthetic shapes: $NUM_TRAIN train + $NUM_VAL val images, ${SIZE}x$SIZE, seed $SEED -> $DATA"
"$PY" tools/misc/make_synthetic_coco.py "$DATA" --num-train "$NUM_TRAIN" \
  --num-val "$NUM_VAL" --size "$SIZE" --seed "$SEED"

step train "$CONFIG -> $WORK_DIR"
if [ "$FRESH" = 1 ] && [ -d "$WORK_DIR" ]; then
  echo "[main job] --fresh: removing $WORK_DIR"
  rm -rf "$WORK_DIR"
fi
MAX_ITERS=$("$PY" -c "
from mmengine.config import Config
print(Config.fromfile('$CONFIG').train_cfg.max_iters)")
CKPT="$WORK_DIR/iter_$MAX_ITERS.pth"
if [ -f "$CKPT" ]; then
  echo "[main job] already trained: $CKPT (--fresh trains again)"
else
  # --resume: continue from the last checkpoint of an interrupted run, if
  # any (mmengine starts from scratch when there is none)
  "$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" --resume
  [ -f "$CKPT" ] || { echo "[main job] training wrote no $CKPT" >&2; false; }
fi

step test "COCO bbox + segm metrics of $CKPT"
TEST_DIR="$WORK_DIR/test"
METRICS="$WORK_DIR/metrics.json"
rm -f "$METRICS"
"$PY" tools/test.py "$CONFIG" "$CKPT" --work-dir "$TEST_DIR"
# the LoggerHook writes the test metrics to <test dir>/<time stamp>/<time
# stamp>.json: keep the newest as metrics.json
latest=$(ls -1d "$TEST_DIR"/*/ | sort | tail -n 1)
"$PY" -c 'import sys; from mmssm.utils.fileio import atomic_copy; atomic_copy(*sys.argv[1:])' \
  "$latest/$(basename "$latest").json" "$METRICS"
"$PY" - "$METRICS" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for kind in ('bbox', 'segm'):
    print(f'[main job] {kind}: AP {m[f"coco/{kind}_mAP"]:.3f}  '
          f'AP50 {m[f"coco/{kind}_mAP_50"]:.3f}  '
          f'AP75 {m[f"coco/{kind}_mAP_75"]:.3f}')
PY

step picture "predictions and pruned tokens on $IMAGE"
PICTURE="$WORK_DIR/main_job.png"
TITLE=$("$PY" - "$METRICS" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f'PlainMamba-L1 (paper pruning) + ViT-Adapter Mask R-CNN on synthetic '
      f'shapes: val box AP {m["coco/bbox_mAP"]:.3f} '
      f'(AP50 {m["coco/bbox_mAP_50"]:.3f}), mask AP {m["coco/segm_mAP"]:.3f}')
PY
)
"$PY" tools/analysis_tools/visualize_detection.py "$CONFIG" "$CKPT" "$IMAGE" \
  --ann-file "$DATA/annotations/instances_val.json" --out "$PICTURE" \
  --title "$TITLE"

step done ''
trap - ERR
echo "[main job] time per step:"
printf '[main job]   %s\n' "${TIMES[@]}"
echo "[main job]   total      $((SECONDS - T0)) s"
echo "[main job] checkpoint: $CKPT"
echo "[main job] metrics:    $METRICS"
echo "[main job] picture:    $PICTURE"
