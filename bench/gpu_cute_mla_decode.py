"""One device run for the CuTe DSL mla_decode: conformance on the GPU, CUDA-graph capture, then a
benchmark side by side with the Triton kernel and the copy/GEMM ceilings measured in the same run.

    source .device/setup.sh && PYTHONUNBUFFERED=1 python bench/gpu_cute_mla_decode.py --out $OUT \
        --check cute --backends triton,cute,cute_v3 --presets memory,compute,latency,spec,fp8

Kernel variants (tokenspeed_kernels_blackwell.mla_decode.VARIANTS) other than the registered one
are registered here by hand as backends ``cute_<variant>`` (e.g. cute_v3), below every other band.

Works without installing the project: registers the reference, Triton and CuTe plugins by hand.
Bench inputs are generated on the GPU (the spec's make_inputs builds caches on the CPU, which takes
minutes for the 10 GB presets); every request at full length s_k, as in the FlashMLA anchor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src"),
          os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import tokenspeed_core  # noqa: E402
from tokenspeed_core.bench import gpu_state, time_calls  # noqa: E402

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def build_registry():
    reg = tokenspeed_core.build_registry(entry_points=False)
    from tokenspeed_kernels_blackwell import plugin as cute_plugin
    with reg.registering_as("cute"):
        cute_plugin.tokenspeed_register_kernels(registry=reg)
    try:
        from tokenspeed_kernels_triton import plugin as triton_plugin
        with reg.registering_as("triton"):
            triton_plugin.tokenspeed_register_kernels(registry=reg)
    except Exception as exc:  # the Triton baseline is optional
        log(f"triton plugin failed: {exc!r}")
    from tokenspeed_core import Priority
    from tokenspeed_kernels_blackwell import mla_decode as cm

    with reg.registering_as("cute"):
        for v in cm.VARIANTS:
            if v != cm.DEFAULT_VARIANT:
                reg.register("mla_decode", cm.make_mla_decode(v), backend=f"cute_{v}", devices=("cuda",),
                             capability=((9, 0), (9, 0)), dtypes=cm.DTYPES, supports=cm.supports_for(v),
                             priority=Priority.PORTABLE - 20, doc=f"CuTe mla_decode, kernel variant {v}")
    return reg


def bench_inputs(case, device):
    b, ql, h, s, ps = case["B"], case["q_len"], case["H"], case["seqlen"], case["page_size"]
    dtype = case["dtype"]
    pages = -(-s // ps)
    num_pages = b * pages + 1
    cache_dtype = case.get("cache_dtype") or dtype
    fp8 = cache_dtype == torch.float8_e4m3fn
    kv_scale = 0.05 if fp8 else 1.0
    cache = torch.randn((num_pages, ps, 576), device=device, dtype=dtype)
    if fp8:  # values ~ N(0, 1 / kv_scale): the dequantised rows are ~ N(0, 1)
        cache = (cache / kv_scale).to(cache_dtype)
    table = torch.randperm(num_pages, device=device)[: b * pages].view(b, pages).to(torch.int32)
    return dict(
        q=torch.randn((b, ql, h, 576), device=device, dtype=dtype), kv_cache=cache, page_table=table,
        cache_seqlens=torch.full((b,), s, dtype=torch.int32, device=device),
        out=torch.empty((b, ql, h, 512), device=device, dtype=dtype),
        lse=torch.empty((b, ql, h), device=device, dtype=torch.float32),
        softmax_scale=1.0 / math.sqrt(192), head_dim_v=512, kv_scale=kv_scale,
    )


def conformance(reg, out_dir, backend):
    from tokenspeed_core.testing import check_backend

    rep = check_backend("mla_decode", backend, size="full", device="cuda", registry=reg)
    text = rep.format(verbose=True)
    with open(os.path.join(out_dir, f"conformance-{backend}.txt"), "w") as f:
        f.write(text)
    ok = getattr(rep, "ok", None)
    counts = {}
    for r in rep.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    log(f"conformance {backend} ok={ok} {counts}")
    for r in rep.results:
        if r.status in ("fail", "error"):
            print(f"  {r.status}: {r.label} :: err={r.max_abs_err} :: {r.detail[:400]}")
    return ok, counts


GRAPH_CASES = (  # 32 folded rows (v4); 64 and 128 over an fp8 cache (the see-saw kernel's producer)
    dict(B=4, q_len=2, H=16, page_size=64, seqlen=1000, dtype=torch.bfloat16),
    dict(B=4, q_len=4, H=16, page_size=64, seqlen=1000, dtype=torch.bfloat16, cache_dtype=torch.float8_e4m3fn),
    dict(B=4, q_len=1, H=128, page_size=64, seqlen=1000, dtype=torch.float16, cache_dtype=torch.float8_e4m3fn),
)


def graph_check(reg, device, backend):
    """Each of GRAPH_CASES: capture one decode call in a CUDA graph, replay on new data (new
    queries and lengths), compare with eager. True if every case matched."""
    return all(graph_check_case(reg, device, backend, case) for case in GRAPH_CASES)


def graph_check_case(reg, device, backend, case):
    impl = reg.backend("mla_decode", backend)
    a = bench_inputs(case, device)
    impl.fn(**a)  # compile + warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        impl.fn(**a)
    a["q"].copy_(torch.randn_like(a["q"]))
    a["cache_seqlens"].copy_(torch.tensor([1000, 3, 640, 65], dtype=torch.int32, device=device))
    g.replay()
    torch.cuda.synchronize()
    got_o, got_l = a["out"].clone(), a["lse"].clone()
    impl.fn(**a)
    torch.cuda.synchronize()
    same = torch.equal(got_o, a["out"]) and torch.equal(got_l, a["lse"])
    log(f"{backend}: cuda graph replay == eager: {same} ({case})")
    return same


def bench(reg, device, ceil, presets, out_dir, deadline, wanted, cooldown_s=0.0):
    spec = reg.spec("mla_decode")
    rows = []
    backends = [b for b in wanted if any(i.backend == b for i in reg.impls["mla_decode"])]
    for preset in presets:
        for case in spec.presets[preset]:
            if time.time() > deadline:
                log("deadline: stopping the benchmark")
                return rows
            case = dict(case)
            try:
                a = bench_inputs(case, device)
            except torch.OutOfMemoryError:
                log(f"OOM building {case}")
                continue
            call = spec.bind({k: v for k, v in a.items()})
            cost = spec.cost(call)
            row = dict(preset=preset, B=case["B"], q_len=case["q_len"], H=case["H"], s_k=case["seqlen"])
            outs = {}
            for be in backends:
                impl = reg.backend("mla_decode", be)
                try:
                    impl.fn(**a)
                    outs[be] = (a["out"].float().clone(), a["lse"].clone())
                    if cooldown_s:  # the row before may have left the card at its power limit
                        time.sleep(cooldown_s)
                    try:  # graph replay: the launch cost on the host is not what we measure
                        t = time_calls([lambda impl=impl, a=a: impl.fn(**a)], device, warmup=3, iters=20, max_seconds=2.0,
                                       cuda_graph=True)
                    except Exception as exc:
                        row[be + "_graph_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                        t = time_calls([lambda impl=impl, a=a: impl.fn(**a)], device, warmup=3, iters=30, max_seconds=3.0)
                    row[be + "_method"] = t.method
                    # the clock / power / temperature the timing ended at (gpu_state's docstring)
                    row.update({f"{be}_{k}": v for k, v in gpu_state(device.index or 0).items()})
                    us = t.median_us
                    row[be + "_us"] = round(us, 1)
                    row[be + "_gbps"] = round(cost.bytes / us / 1e3, 1)
                    row[be + "_tflops"] = round(cost.flops / us / 1e6, 1)
                    row[be + "_copy_pct"] = round(100 * cost.bytes / us / 1e3 / ceil.copy_gbps, 1)
                    row[be + "_gemm_pct"] = round(100 * cost.flops / us / 1e6 / ceil.gemm_tflops, 1)
                except Exception as exc:
                    row[be + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if "triton" in outs:  # big caches are past the CPU reference: cross-check the backends
                ot, lt = outs["triton"]
                for be, (oc, lc) in outs.items():
                    if be != "triton":
                        row[be + "_vs_triton"] = [round(float((oc - ot).abs().max()), 4),
                                                  round(float((lc - lt).abs().max()), 4)]
            del outs
            rows.append(row)
            log(json.dumps(row))
            del a, call
            torch.cuda.empty_cache()
            with open(os.path.join(out_dir, "bench.json"), "w") as f:
                json.dump({"ceilings": ceil.__dict__, "rows": rows}, f, indent=1)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=520.0)
    ap.add_argument("--presets", default="latency,memory,spec,compute")
    ap.add_argument("--check", default="cute", help="backends to run the full conformance grid on ('' = none)")
    ap.add_argument("--backends", default="triton,cute", help="backends to time side by side")
    ap.add_argument("--check-late", default="", help="backends to check after the benchmark, time permitting")
    ap.add_argument("--late-need-s", type=float, default=80.0, help="time a late check needs")
    ap.add_argument("--cooldown-s", type=float, default=0.0,
                    help="idle seconds before each backend's timing (long compute-bound rows can leave the card "
                         "power-limited for the next)")
    args = ap.parse_args()
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    log(f"{torch.cuda.get_device_name(0)} torch {torch.__version__}")
    import cutlass
    log(f"nvidia-cutlass-dsl {getattr(cutlass, '__version__', '?')}")
    reg = build_registry()
    summary = {}
    for be in filter(None, args.check.split(",")):
        try:
            summary[be + "_graph_ok"] = graph_check(reg, device, be)
        except Exception:
            traceback.print_exc()
        try:
            summary[be + "_conformance"] = conformance(reg, args.out, be)
        except Exception:
            traceback.print_exc()
    from tokenspeed_core.bench import get_ceilings

    ceil = get_ceilings(device, remeasure=True)
    log(f"ceilings: copy {ceil.copy_gbps} GB/s, bf16 GEMM {ceil.gemm_tflops} TFLOP/s")
    backends = args.backends.split(",")
    rows = bench(reg, device, ceil, args.presets.split(","), args.out, T0 + args.budget_s, backends,
                 args.cooldown_s)
    print("summary (early)", summary)
    print(f"{torch.cuda.get_device_name(0)}: copy {ceil.copy_gbps} GB/s, GEMM {ceil.gemm_tflops} TFLOP/s; "
          "cells: us / %copy / %gemm (CUDA-graph replay, L2 flushed)")
    print("| preset | B | q | H | s_k | " + " | ".join(backends) + " | best cute vs triton |")
    for r in rows:
        cells = []
        for be in backends:
            us = r.get(be + "_us")
            cells.append(f"{us} / {r.get(be + '_copy_pct')} / {r.get(be + '_gemm_pct')}" if us
                         else str(r.get(be + "_error", "-"))[:30])
        cute = [r[be + "_us"] for be in backends if be.startswith("cute") and r.get(be + "_us")]
        tr = r.get("triton_us")
        ratio = f"{tr / min(cute):.2f}x" if cute and tr else "-"
        print(f"| {r['preset']} | {r['B']} | {r['q_len']} | {r['H']} | {r['s_k']} | " + " | ".join(cells)
              + f" | {ratio} |")
    for r in rows:
        d = {k: v for k, v in r.items() if k.endswith("_vs_triton") or k.endswith("error")}
        if d:
            print(r["preset"], r["B"], r["q_len"], r["H"], r["s_k"], d)
    for be in filter(None, args.check_late.split(",")):
        if time.time() + args.late_need_s > T0 + args.budget_s:
            log(f"no time left for the conformance grid of {be}")
            continue
        try:
            summary[be + "_conformance"] = conformance(reg, args.out, be)
        except Exception:
            traceback.print_exc()
    print("summary", summary)


if __name__ == "__main__":
    main()
