#!/usr/bin/env bash
# The CPU load bench of the bundled demo pair, as docs/load_bench_cpu/ keeps it: the round
# profile of each concurrency level, then every policy at c = 1, 2, 4, 8 in one process.
#
#   bash docs/load_bench_cpu/run.sh            # from the repository root; writes docs/load_bench_cpu/
#
# OUT (docs/load_bench_cpu), REPEATS (3) and RPC (6, requests per client) override the
# defaults. Run it alone on the machine: anything else running corrupts the timings.
set -euo pipefail
OUT=${OUT:-docs/load_bench_cpu} REPEATS=${REPEATS:-3} RPC=${RPC:-6}
rm -f "$OUT/sps_profile.json"    # records of an earlier pair would stay beside the new ones
for c in 1 2 4 8; do
  python -m serve.profile_sps --slots "$c" --max-len 272 --out "$OUT/sps_profile.json" --repeats 5
done
python -m serve.load_bench --prompt-file docs/load_bench_cpu/prompts.jsonl --concurrency 1 2 4 8 \
  --policy none mtp1 fixed threshold algorithm1 production --max-new-tokens 32 --length-spread 0.5 \
  --buckets pow2 --repeats "$REPEATS" --requests-per-client "$RPC" --sps-file "$OUT/sps_profile.json" --out-dir "$OUT"
