#!/usr/bin/env bash
# Device checks run on a lent GPU (see README "Benchmarks"): the paper's stage-2 batch of 19,200
# at bge-small-zh shapes (query 32 / passage 128 tokens, bf16), with and without GradCache, one
# process each so the device peak is per configuration; then the tiny-model memory table.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() { name=$1; shift; timeout 240 python3 launch/bench.py gradcache "$@" --run --out "$OUT/$name.json" 2>&1 | grep -v -i warn | tee "$OUT/$name.log"; }
run gc19200_cached --preset bge-small-zh --batches 19200 --chunks 1200 --dtype bfloat16
run gc19200_plain --preset bge-small-zh --batches 19200 --chunks 0 --dtype bfloat16
run gc_tiny --preset tiny --batches 256,1024,4096 --chunks 0,256
