#!/bin/bash
# A/B of CuTe mla_prefill builds on the device machine, one process per build and round:
#   bash scripts/prefill_ab.sh TAG ROUNDS "label:DIR ..."
# DIR is a whole tree (e.g. `git archive <rev> | tar x -C ab_x`, or . for this one): each process
# runs that tree's own bench/gpu_cute_prefill.py (which puts its tree first on sys.path, checks
# correctness in float64, runs the conformance kit and graph replay, then times the anchor rows
# against Triton and cuDNN in the same process). Builds alternate within a round and the order
# reverses every other round (A B C, C B A, ...), so a drift of the card's clock or power state
# falls on every build alike. Each build gets its own compile cache (the cache prunes entries of
# other sources). Logs and JSON go to $OUT/TAG/<label>/; each process's table prints as it ends.
# Needs the CuTe DSL bundle unpacked on the machine (.device/setup.sh).
source .device/setup.sh >/dev/null
export PYTHONUNBUFFERED=1
TAG=$1; ROUNDS=$2; read -r -a BUILDS <<< "$3"
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
for ((i = 0; i < ROUNDS; i++)); do
  order=("${BUILDS[@]}")
  if ((i % 2)); then order=(); for ((j = ${#BUILDS[@]} - 1; j >= 0; j--)); do order+=("${BUILDS[j]}"); done; fi
  for b in "${order[@]}"; do
    IFS=: read -r label dir <<< "$b"
    out="$OUT/$TAG/$label/r$i"; mkdir -p "$out"
    ( cd "$dir" && TOKENSPEED_CACHE_DIR="/tmp/tsc_prefill_$label" timeout -k 5 200 \
        python bench/gpu_cute_prefill.py --out "$out" > "$out/log.txt" 2>&1 ) || echo "FAILED $label round $i"
    echo "== $label, round $i"
    grep -i "FAIL\|Traceback" "$out/log.txt" | head -4
    grep -A 12 "correctness" "$out/log.txt" | grep -v "^$"
  done
done
