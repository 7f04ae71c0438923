"""A/B timing of one CuTe mla_decode build against another, in separate processes.

A kernel knob that changes generated code (a temporary environment switch read at import, with
``TOKENSPEED_CUTE_CACHE=0`` so nothing is served from the disk cache) is compared by running this
script once per setting, interleaved, on the same warm machine:

    for i in 1 2; do for v in 1 0; do
      TOKENSPEED_CUTE_CACHE=0 SOME_SWITCH=$v python3 bench/gpu_cute_ab.py --label "switch=$v" \
          --rows "1,1,128,65536;64,4,128,16384"
    done; done

Each row: the default variant's time (CUDA-graph replay, L2 flushed, median) and its largest
difference from the Triton kernel's output on the same inputs (a wrong build shows here). One
JSON line per row; ``--out`` appends them to ``ab.jsonl``. ``--src DIR`` imports the kernel
package from DIR instead (another checkout's ``tokenspeed_kernels_blackwell/src``: the build
before a change, copied beside the tree); ``--kernels`` adds each kernel's own device time
(torch.profiler, eager calls: split stage and combine apart); ``--splits 16,32,64`` adds the
time at each forced split count (the split rule's sweep); ``--flush read`` flushes L2 with a read
instead of the anchors' write (whose dirty lines a streaming kernel writes back during its call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_cute_latency import kernel_times  # noqa: E402
from gpu_cute_mla_decode import bench_inputs, build_registry  # noqa: E402

from tokenspeed_core.bench import gpu_state, time_calls  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True, help="what this process's build is (printed on every row)")
    ap.add_argument("--rows", required=True,
                    help="'B,q,H,s_k[,fp8][,fp16];...' (fp8: an fp8 e4m3 cache; fp16: an fp16 query, else bf16)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--src", default="", help="import tokenspeed_kernels_blackwell from this directory")
    ap.add_argument("--kernels", action="store_true", help="also each kernel's device time (profiler)")
    ap.add_argument("--splits", default="", help="also time these forced split counts per row ('16,32,64')")
    ap.add_argument("--flush", default="write", choices=("write", "read"),
                    help="L2 flush before each call: a write (as the anchors' do_bench; leaves dirty lines) or a read")
    ap.add_argument("--cooldown-s", type=float, default=0.0,
                    help="idle seconds before each row's timing (a long compute-bound row can leave the card "
                         "power-limited for the next); each row records the clock its timing ended at")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    device = torch.device("cuda")
    reg = build_registry()
    triton = reg.backend("mla_decode", "triton")
    from tokenspeed_kernels_blackwell import mla_decode as cm

    for r in args.rows.split(";"):
        b, ql, h, s, *flags = r.split(",")
        b, ql, h, s = int(b), int(ql), int(h), int(s)
        if set(flags) - {"fp8", "fp16"}:
            raise SystemExit(f"row {r!r}: flags after s_k are fp8 (cache) and fp16 (query), got {flags}")
        cache_dtype = torch.float8_e4m3fn if "fp8" in flags else None
        dtype = torch.float16 if "fp16" in flags else torch.bfloat16
        a = bench_inputs(dict(B=b, q_len=ql, H=h, seqlen=s, page_size=64, dtype=dtype,
                              cache_dtype=cache_dtype), device)
        triton.fn(**a)
        ref = a["out"].clone()
        a["out"].fill_(float("nan"))
        cm.mla_decode(**a)
        diff = float((a["out"].float() - ref.float()).abs().max())
        if args.cooldown_s:
            time.sleep(args.cooldown_s)
        t = time_calls([lambda a=a: cm.mla_decode(**a)], device, cuda_graph=True, flush_l2=args.flush).median_us
        row = dict(label=args.label, B=b, q_len=ql, H=h, s_k=s, cache="fp8" if cache_dtype else "16-bit",
                   dtype=str(dtype).removeprefix("torch."),
                   flush=args.flush, cute_us=round(t, 1),
                   max_diff_vs_triton=round(diff, 4), card=torch.cuda.get_device_name(0), **gpu_state())
        if args.kernels:
            try:
                row["kernel_us"] = kernel_times(lambda a=a: cm.mla_decode(**a))
            except Exception as exc:  # the timing above stands without it
                row["kernel_us"] = f"{type(exc).__name__}: {str(exc)[:100]}"
        for n in (int(x) for x in args.splits.split(",") if x):
            a["out"].fill_(float("nan"))
            cm.mla_decode(**a, num_kv_splits=n)
            d_n = float((a["out"].float() - ref.float()).abs().max())
            t_n = time_calls([lambda a=a, n=n: cm.mla_decode(**a, num_kv_splits=n)], device, cuda_graph=True,
                             flush_l2=args.flush).median_us
            row[f"splits_{n}_us"] = round(t_n, 1) if d_n < 0.05 else f"wrong ({d_n:.3g})"
        print(json.dumps(row), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "ab.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        del a, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
