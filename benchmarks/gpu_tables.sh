#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one prepared run: the speed table of the three
# families at batch 1 and a throughput batch in float32 and bfloat16, and the Stage I step of
# DS-ViT-S in bfloat16 (MFU). Appends a dated section to benchmarks/RESULTS.md (or $RESULTS).
#
#   bash benchmarks/gpu_tables.sh                       # on the GPU machine
#   IMAGE_SIZE=32 BATCH=4 STEP_BATCH=16 ROUNDS=1 MODELS=ds_mbnet RESULTS=/tmp/r.md \
#     bash benchmarks/gpu_tables.sh                     # a CPU try (the tests run it)
#
# The speed tables need jax, flax and numpy only; the Stage I step builds a training run and so
# also needs ml_collections, absl-py, grain and tensorflow-datasets (carry their wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH=${BATCH:-256}
ROUNDS=${ROUNDS:-5}
MODELS=${MODELS:-ds_mbnet,ds_resnet,ds_vit}  # the speed tables' families
STEP_BATCH=${STEP_BATCH:-256}  # Stage I step of DS-ViT-S (MvCo: two views of each image)
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
section=$(mktemp)
device=$($PYTHON -c 'import jax; d = jax.devices()[0]; print(f"{d.platform}, {d.device_kind}")')
{
  echo
  echo "## $device, $(date -u +%F) (benchmarks/gpu_tables.sh at $(git rev-parse --short HEAD))"
  for dtype in float32 bfloat16; do
    echo
    echo '```'
    $PYTHON benchmarks/speed.py --models="$MODELS" --image_size="$IMAGE_SIZE" \
        --batch_sizes=1,"$BATCH" --rounds="$ROUNDS" --dtype="$dtype"
    echo '```'
  done
  echo
  echo '```'
  $PYTHON benchmarks/train_step.py --config=configs/vit_s.py --image_size="$IMAGE_SIZE" \
      --batch="$STEP_BATCH" --rounds="$ROUNDS" --dtype=bfloat16
  echo '```'
} | tee "$section"
cat "$section" >> "$RESULTS"
echo "appended to $RESULTS"
