#!/usr/bin/env bash
# Device checks for a lent GPU, prepared on CPU so one short run gives the figures (README
# "Benchmarks"). Files land in $OUT (default /tmp/gpu_checks).
#
#   launch/gpu_checks.sh [mfu [ARGS]]  MFU of the bge-base train steps (launch/gpu_bench.py): stage 2
#                                  (512 + 512 tokens, 64 pairs) and stage 1 (512 tokens, batch 64)
#                                  with dropout as in training, then stage 2 with attention
#                                  dropout 0 (the fused cuDNN attention path). About 7 minutes
#                                  on one H100/H200, most of it compiling. ARGS go to
#                                  gpu_bench (`mfu --smoke`: tiny shapes, checks it on CPU).
#   launch/gpu_checks.sh gradcache the paper's stage-2 batch of 19,200 at bge-small-zh shapes
#                                  (query 32 / passage 128 tokens, bf16) with and without
#                                  GradCache, one process each so the device peak is per
#                                  configuration; then the tiny-model memory table.
set -uo pipefail
MODE=${1:-mfu}
EXTRA=("${@:2}")
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
failed=0
# run SECONDS NAME COMMAND...: one check under a time limit, its log in $OUT/NAME.log.
run() {
  limit=$1; name=$2; shift 2
  timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then echo "[gpu_checks] $name: exit $status" | tee -a "$OUT/failed.txt"; failed=1; fi
}
case "$MODE" in
  mfu)
    run 330 mfu_dropout python3 launch/gpu_bench.py --out "$OUT/mfu_dropout" "${EXTRA[@]}"
    run 200 mfu_fused_attention python3 launch/gpu_bench.py --stages 2 --attention-dropout 0 \
      --out "$OUT/mfu_fused_attention" "${EXTRA[@]}"
    ;;
  gradcache)
    gc() { name=$1; shift; run 240 "$name" python3 launch/bench.py gradcache "$@" --run --out "$OUT/$name.json"; }
    gc gc19200_cached --preset bge-small-zh --batches 19200 --chunks 1200 --dtype bfloat16
    gc gc19200_plain --preset bge-small-zh --batches 19200 --chunks 0 --dtype bfloat16
    gc gc_tiny --preset tiny --batches 256,1024,4096 --chunks 0,256
    ;;
  *)
    echo "usage: launch/gpu_checks.sh [mfu|gradcache]" >&2; exit 2 ;;
esac
exit $failed
