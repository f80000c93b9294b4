#!/usr/bin/env bash
# The load benchmark of the bundled demo pair on a GPU, one concurrency level per process
# so that a level that finishes is kept even if a later one runs out of time.
#
#   OUT=work/lb_gpu bash docs/load_bench_gpu/run.sh [SECONDS]     # from the repository root
#
# SECONDS (default 520) bounds the whole script: a level starts only with 60 s left, and
# runs under `timeout` for what is left. Writes, under $OUT: log.txt (environment and
# progress), sps_profile.json (SPS(B) and the round profiles), levels.tgz (each level's
# results.json, results.md and plots; merge them with `python -m serve.load_bench --merge`)
# and, with time left, kernels.txt (the Pallas GPU kernel tests; KERNELS=0 skips them).
# REPEATS (3) and RPC (12, requests per client) set the timed runs' length.
set -u
OUT=${OUT:-work/lb_gpu}
BUDGET=${1:-520}
LEVELS=${LEVELS:-"1 8 4 2"}
KERNELS=${KERNELS:-1} REPEATS=${REPEATS:-3} RPC=${RPC:-12}
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# one compilation cache for all levels' processes: programs that repeat across them compile once
export JAX_COMPILATION_CACHE_DIR=/tmp/dspark_jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PY=${PYTHON:-python3}
mkdir -p "$OUT" /tmp/dspark_lb
OUT=$(cd "$OUT" && pwd)
log=$OUT/log.txt
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nproc
  $PY -c "import jax, flax, optax, numpy; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'numpy', numpy.__version__); print(jax.devices())"
} 2>&1 | tee -a "$log"

for c in $LEVELS; do
  l=$(left)
  if [ "$l" -lt 60 ]; then echo "skipped c=$c: ${l}s left" | tee -a "$log"; continue; fi
  t0=$(date +%s)
  timeout "$l" $PY -m serve.profile_sps --slots "$c" --max-len 272 --out "$OUT/sps_profile.json" 2>&1 | \
      tr '\r' '\n' | grep -v '^ *$' | tail -4 | tee -a "$log"
  timeout "$l" $PY -m serve.load_bench --prompt-file docs/load_bench_cpu/prompts.jsonl --concurrency "$c" \
      --max-new-tokens 32 --length-spread 0.5 --requests-per-client "$RPC" --buckets pow2 --repeats "$REPEATS" \
      --sps-file "$OUT/sps_profile.json" --out-dir "/tmp/dspark_lb/c$c" 2>&1 | tr '\r' '\n' | \
      grep -v '^ *$' | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "c=$c: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$log"
  tar -czf "$OUT/levels.tgz" -C /tmp/dspark_lb . 2>/dev/null
  if [ "$rc" -ne 0 ] && [ "$(($(date +%s) - t0))" -lt 60 ]; then echo "c=$c failed fast: stopping" | tee -a "$log"; exit 1; fi
done

l=$(left)
if [ "$KERNELS" != 0 ] && [ "$l" -ge 60 ]; then
  JAX_PLATFORMS=cuda timeout "$l" $PY -m pytest -q -p no:cacheprovider -k GPU \
      tests/test_kernels_verify.py tests/test_kernels_block.py 2>&1 | tee "$OUT/kernels.txt" | tail -5
fi
echo "done after $(($(date +%s) - start)) s" | tee -a "$log"
