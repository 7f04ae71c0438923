"""b = 1 latency study of the CuTe mla_decode (one device call, ~1 min):

    source .device/setup.sh && PYTHONUNBUFFERED=1 python3 bench/gpu_cute_latency.py --out $OUT

For each latency row (b = 1, s_k 16K/64K, H 16/128): the time of the registered variant at the
split count of its rule and at a sweep of forced split counts (CUDA-graph replay, L2 flushed),
the eager call timed as the anchors were (triton's do_bench, L2 flushed, median), the floor of
both methods (a kernel that does nothing),
and the per-kernel GPU time (split kernel vs combine) from torch.profiler, beside Triton.
Everything goes to $OUT/latency.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_cute_mla_decode import bench_inputs, build_registry, log  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from tokenspeed_core.bench import time_calls  # noqa: E402

ROWS = [(1, 1, 16, 16384), (1, 1, 16, 65536), (1, 1, 128, 16384), (1, 1, 128, 65536), (1, 4, 16, 65536)]
SPLITS = (16, 32, 48, 66, 88, 132, 176, 264)
OTHER_VARIANTS = ("v3",)  # timed beside the default (--other-variants)


def kernel_times(fn, iters=10):
    """Mean GPU time per call of each kernel fn launches (µs), by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            out[ev.key[:60]] = round(t / iters, 2)
    return out


def host_us(fn, n=300):
    """Host time per call of back-to-back eager calls whose GPU work is tiny (so the host bounds)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return round(dt * 1e6, 1)


def host_overheads(reg, device):
    """Where an eager decode call's host time goes: the op API (validation + selection), the CuTe
    launcher, and the bare TVM-FFI call of the compiled kernel with prepared arguments."""
    from tokenspeed_kernels_blackwell import mla_decode as cm

    case = dict(B=1, q_len=1, H=16, seqlen=64, page_size=64, dtype=torch.bfloat16)
    a = bench_inputs(case, device)
    res = {"registry.call": host_us(lambda: reg.call("mla_decode", **a)),
           "launcher": host_us(lambda a=a: cm.mla_decode(**a))}
    fn, splits, m, variant = cm._launch_plan(0, a["q"].dtype, 1, 1, 16, 576, a["kv_cache"].dtype, 64,
                                             a["page_table"].shape[1], 512, None, None)
    o_part, lse_part = cm.partial_buffers(1, splits, m, 512, a["q"].dtype, device, variant)
    args = (a["q"].view(1, m, 576), a["kv_cache"].view(-1, 576), a["page_table"], a["cache_seqlens"], o_part,
            lse_part, a["out"].view(1, m, 512), a["lse"].view(1, m),
            cm.positive_scale_log2(a["q"], a["softmax_scale"])[1], 1.0)
    res["tvm-ffi call"] = host_us(lambda: fn(*args))
    res["partial buffers"] = host_us(lambda: cm.partial_buffers(1, splits, m, 512, a["q"].dtype, device, variant))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--other-variants", default=",".join(OTHER_VARIANTS),
                    help="variants timed beside the default, comma-separated")
    ap.add_argument("--rows", default="", help="rows to study instead of the latency rows: 'B,q,H,s_k;...'")
    ap.add_argument("--splits", default="", help="forced split counts to sweep, comma-separated ('rule': none)")
    ap.add_argument("--no-extras", action="store_true", help="skip the fp8 rows and the host-overhead probe")
    args = ap.parse_args()
    rows = [tuple(int(x) for x in r.split(",")) for r in args.rows.split(";") if r] or ROWS
    splits = () if args.splits == "rule" else tuple(int(x) for x in args.splits.split(",") if x) or SPLITS
    others = tuple(v for v in args.other_variants.split(",") if v)
    device = torch.device("cuda")
    reg = build_registry()
    from tokenspeed_core.bench import get_ceilings
    from tokenspeed_kernels_blackwell import mla_decode as cm

    ceil = get_ceilings(device, remeasure=True)
    log(f"{torch.cuda.get_device_name(0)}: copy {ceil.copy_gbps} GB/s, GEMM {ceil.gemm_tflops} TFLOP/s")
    triton = reg.backend("mla_decode", "triton")
    # what each timing method reads for a kernel that does nothing: its floor
    tiny = torch.zeros(1, device=device)
    floor = {"graph_us": round(time_calls([tiny.zero_], device, cuda_graph=True).median_us, 1),
             "do_bench_us": round(1e3 * do_bench(tiny.zero_, return_mode="median"), 1)}
    log(f"timing floor (one 1-element kernel): {floor}")
    results = []
    for b, ql, h, s in rows:
        case = dict(B=b, q_len=ql, H=h, seqlen=s, page_size=64, dtype=torch.bfloat16)
        a = bench_inputs(case, device)
        row = dict(B=b, q_len=ql, H=h, s_k=s, variant=cm.DEFAULT_VARIANT)
        row["triton_us"] = round(time_calls([lambda a=a: triton.fn(**a)], device, cuda_graph=True).median_us, 1)
        ref_out = a["out"].clone()
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        row["rule_splits"] = cm.split_count(cm.DEFAULT_VARIANT, b, h * ql, a["page_table"].shape[1] * 64, sms,
                                            a["kv_cache"].dtype)
        row["cute_us"] = round(time_calls([lambda a=a: cm.mla_decode(**a)], device, cuda_graph=True).median_us, 1)
        # the anchors' method: triton's do_bench of the eager call, L2 flushed, median
        row["cute_do_bench_us"] = round(1e3 * do_bench(lambda a=a: cm.mla_decode(**a), return_mode="median"), 1)
        row["triton_do_bench_us"] = round(1e3 * do_bench(lambda a=a: triton.fn(**a), return_mode="median"), 1)
        row["max_diff_vs_triton"] = round(float((a["out"].float() - ref_out.float()).abs().max()), 4)
        row["kernels"] = kernel_times(lambda a=a: cm.mla_decode(**a))
        for v in others:
            row[f"{v}_us"] = round(time_calls([lambda a=a, v=v: cm.mla_decode(**a, variant=v)], device,
                                              cuda_graph=True).median_us, 1)
            row[f"{v}_kernels"] = kernel_times(lambda a=a, v=v: cm.mla_decode(**a, variant=v))
        for sp in splits:
            t = time_calls([lambda a=a, sp=sp: cm.mla_decode(**a, num_kv_splits=sp)], device, cuda_graph=True).median_us
            row[f"splits_{sp}_us"] = round(t, 1)
        row["kernels_splits_32"] = kernel_times(lambda a=a: cm.mla_decode(**a, num_kv_splits=32))
        results.append(row)
        log(json.dumps(row))
        del a
        torch.cuda.empty_cache()
    fp8_rows = []
    for qdt in (() if args.no_extras else (torch.bfloat16, torch.float16)):  # e4m3 -> f16 is one cvt per pair; -> bf16 goes via f32
        for cache_dtype in (qdt, torch.float8_e4m3fn):
            case = dict(B=64, q_len=1, H=16, seqlen=16384, page_size=64, dtype=qdt, cache_dtype=cache_dtype)
            a = bench_inputs(case, device)
            row = dict(q=str(qdt), cache=str(cache_dtype))
            for v in (cm.DEFAULT_VARIANT,) + others:
                if cache_dtype == torch.float8_e4m3fn and v not in cm.FP8_VARIANTS:
                    continue
                row[f"{v}_us"] = round(time_calls([lambda a=a, v=v: cm.mla_decode(**a, variant=v)], device,
                                                  cuda_graph=True).median_us, 1)
            row["kernels"] = kernel_times(lambda a=a: cm.mla_decode(**a))
            fp8_rows.append(row)
            log(json.dumps(row))
            del a
            torch.cuda.empty_cache()
    host = {} if args.no_extras else host_overheads(reg, device)
    log(json.dumps(host))
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump({"ceilings": ceil.__dict__, "floor": floor, "rows": results, "fp8_rows": fp8_rows, "host": host},
                  f, indent=1)
    print(f"{torch.cuda.get_device_name(0)} (µs, CUDA-graph replay, L2 flushed)")
    print(f"timing floor (a 1-element kernel): graph {floor['graph_us']} µs, do_bench {floor['do_bench_us']} µs")
    print("| B | q | H | s_k | triton | cute (rule splits) | triton / cute do_bench | "
          + " | ".join(f"s={s}" for s in splits) + " |")
    for r in results:
        print(f"| {r['B']} | {r['q_len']} | {r['H']} | {r['s_k']} | {r['triton_us']} | {r['cute_us']} "
              f"({r['rule_splits']}) | {r['triton_do_bench_us']} / {r['cute_do_bench_us']} | "
              + " | ".join(str(r[f'splits_{s}_us']) for s in splits) + " |")
    for r in results:
        print(r["H"], r["s_k"], r["q_len"], "kernels:", r["kernels"], "| at 32 splits:", r["kernels_splits_32"])
        for v in others:
            print("   ", v, r[f"{v}_us"], "µs", r[f"{v}_kernels"])
    print("host µs per eager call (B=1, H=16, 64 tokens: GPU time ~ a few µs):", host)
    print("B=64 q_len=1 H=16 s_k=16384 (µs):")
    for r in fp8_rows:
        print("  ", r)


if __name__ == "__main__":
    main()
