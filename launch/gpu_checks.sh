#!/usr/bin/env bash
# Device checks for a lent GPU, prepared on CPU so one short run gives the figures (README
# "Benchmarks"). Files land in $OUT (default /tmp/gpu_checks).
#
#   launch/gpu_checks.sh [mfu [ARGS]]  MFU of the bge-base stage-2 train step (launch/gpu_bench.py;
#                                  512 + 512 tokens, 64 pairs), the target, three ways:
#                                  attention dropout 0.1 as in training on the explicit softmax
#                                  path (the default), the same through the fused Pallas kernel
#                                  with dropout (model.attention_impl=pallas; checked against
#                                  plain attention on the device first), and attention dropout 0
#                                  (the fused cuDNN path). At most 9 minutes, most of it
#                                  compiling. ARGS go to gpu_bench (`mfu --smoke`: tiny shapes,
#                                  checks it on CPU).
#   launch/gpu_checks.sh mfu-stage1 [ARGS]  the same for stage 1 (RetroMAE, 512 tokens, batch 64):
#                                  explicit path, then the fused kernel.
#   launch/gpu_checks.sh gradcache the paper's stage-2 batch of 19,200 at bge-small-zh shapes
#                                  (query 32 / passage 128 tokens, bf16) with and without
#                                  GradCache, one process each so the device peak is per
#                                  configuration; then the tiny-model memory table.
set -uo pipefail
MODE=${1:-mfu}
EXTRA=("${@:2}")
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# JAX's persistent compilation cache: a rerun on the same machine (after a timeout, or the
# second mode) reads the compiled steps instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/bge_jax_xla_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# gpu_bench builds the trainer's own step from configs/, which need ml_collections (pure Python;
# its needs absl-py and PyYAML are on the device image, ml_collections is not). Carry its wheel:
# here, once, `pip download --no-deps -d .whl ml-collections` (and `echo /.whl/ >>
# .git/info/exclude`); name .whl in the device call's carry.
if ! python3 -c "import ml_collections" 2>/dev/null; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/bge_jax_site .whl/ml_collections-*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/bge_jax_site
  else
    echo "error: ml_collections is not installed and no .whl/ml_collections-*.whl was carried" \
      "(see the comment above this line in launch/gpu_checks.sh)" >&2
    exit 2
  fi
fi
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
    run 200 mfu_dropout python3 launch/gpu_bench.py --stages 2 --out "$OUT/mfu_dropout" "${EXTRA[@]}"
    run 200 mfu_pallas python3 launch/gpu_bench.py --stages 2 --attention-impl pallas \
      --out "$OUT/mfu_pallas" "${EXTRA[@]}"
    run 140 mfu_fused_attention python3 launch/gpu_bench.py --stages 2 --attention-dropout 0 \
      --out "$OUT/mfu_fused_attention" "${EXTRA[@]}"
    ;;
  mfu-stage1)
    run 250 mfu_stage1 python3 launch/gpu_bench.py --stages 1 --out "$OUT/mfu_stage1" "${EXTRA[@]}"
    run 250 mfu_stage1_pallas python3 launch/gpu_bench.py --stages 1 --attention-impl pallas \
      --out "$OUT/mfu_stage1_pallas" "${EXTRA[@]}"
    ;;
  gradcache)
    gc() { name=$1; shift; run 240 "$name" python3 launch/bench.py gradcache "$@" --run --out "$OUT/$name.json"; }
    gc gc19200_cached --preset bge-small-zh --batches 19200 --chunks 1200 --dtype bfloat16
    gc gc19200_plain --preset bge-small-zh --batches 19200 --chunks 0 --dtype bfloat16
    gc gc_tiny --preset tiny --batches 256,1024,4096 --chunks 0,256
    ;;
  *)
    echo "usage: launch/gpu_checks.sh [mfu|mfu-stage1|gradcache] [ARGS]" >&2; exit 2 ;;
esac
exit $failed
