#!/bin/bash
# A/B of CuTe mla_decode builds on the device machine, in separate processes, interleaved:
#   bash scripts/device_ab.sh TAG "B,q,H,s_k[,fp8][,fp16];..." REPS "label:SRC:flush ..."
# SRC is a directory holding tokenspeed_kernels_blackwell/src (e.g. from
# `git archive <rev> tokenspeed_kernels_blackwell/src | tar x -C ab_x`), or - for the installed
# package; flush is write (the anchors' method) or read. One process per distinct SRC first warms
# the compile cache in parallel (its timings are discarded), then REPS rounds of one process per
# build; rows go to $OUT/TAG/ab.jsonl and a table (label/flush: one value per process) prints last.
# Needs the CuTe DSL bundle unpacked on the machine (.device/setup.sh, as the bench/gpu_cute_*.py
# scripts say in their headers).
source .device/setup.sh >/dev/null
export PYTHONUNBUFFERED=1 TOKENSPEED_CACHE_DIR=/tmp/tscache
TAG=$1; ROWS=$2; REPS=$3; BUILDS=$4
args_of() {
  IFS=: read -r l s f <<< "$1"
  A=(--label "$l" --rows "$ROWS" --flush "$f" --out "$OUT/$TAG")
  [ "$s" != "-" ] && A+=(--src "$s/tokenspeed_kernels_blackwell/src")
}
mkdir -p "$OUT/$TAG"
declare -A seen
for b in $BUILDS; do
  IFS=: read -r l s f <<< "$b"; [ -n "${seen[$s]}" ] && continue; seen[$s]=1
  args_of "$b"; A[1]="warm"; A[7]=/tmp/warm_$l
  timeout 400 python3 bench/gpu_cute_ab.py "${A[@]}" >> "$OUT/$TAG/warm.log" 2>&1 &
done
wait
for i in $(seq "$REPS"); do
  for b in $BUILDS; do
    args_of "$b"
    timeout 200 python3 bench/gpu_cute_ab.py "${A[@]}" >> "$OUT/$TAG/log.txt" 2>&1 || echo "FAILED $b" | tee -a "$OUT/$TAG/log.txt"
  done
done
grep -i "error\|Traceback" "$OUT/$TAG/log.txt" | head -5
python3 - "$OUT/$TAG/ab.jsonl" <<'PY'
import collections, json, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    d = json.loads(line)
    key = (d["B"], d["q_len"], d["H"], d["s_k"], d.get("cache", "16-bit") + (" fp16" if d.get("dtype") == "float16" else ""))
    rows.setdefault(key, collections.OrderedDict()).setdefault(f"{d['label']}/{d['flush'][0]}", []).append(d["cute_us"])
for k, v in rows.items():
    print("B%d q%d H%d s%d %s | " % k + " | ".join(f"{lab} {','.join(map(str, xs))}" for lab, xs in v.items()))
PY
