"""One GPU session for the Triton ``mla_decode``: ceilings, correctness, config sweep, presets.

    PYTHONUNBUFFERED=1 python bench/gpu_mla_decode.py --out $OUT [--check full] [--sweep]
        [--presets anchor,spec,fp8] [--workers 8]

1. ceilings measured in this run: device-to-device copy (bytes read + written) and bf16 GEMM
   8192^3 through torch.matmul;
2. correctness over the spec's "full" grid (fresh random inputs, outputs poisoned with NaN,
   reference in float64 on the GPU), split over worker processes so Triton compiles in parallel;
3. optional sweep of stage-1 tile configs on a few representative shapes;
4. the benchmark presets (anchor rows = FlashMLA/SGLang table shapes), timed with
   ``triton.testing.do_bench`` (median, L2 flushed), each row spot-checked against the reference
   on its first and last request. Same method as /work/shared/anchors/mla-decode-*.md.

A compact table is printed last; everything goes to ``$OUT/mla_decode.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

from tokenspeed_core.ops import mla_decode as SPEC_MOD  # noqa: E402
from tokenspeed_kernels_triton import mla_decode as TK  # noqa: E402

SPEC = SPEC_MOD.SPEC
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def do_bench(fn, rep=200):
    if DEV == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


# -- helpers ----------------------------------------------------------------------------------
def log(*a):
    print(*a, flush=True)


def ceilings() -> dict:
    n = (1 << 30) if DEV == "cuda" else (1 << 24)  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=300)
    copy_gbs = 2 * n / ms / 1e6
    k = 8192 if DEV == "cuda" else 512
    a = torch.randn(k, k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=DEV, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, rep=300)
    gemm = 2 * k**3 / ms / 1e9
    return {"copy_GBps": copy_gbs, "gemm_bf16_TFLOPs": gemm}


def reference64(inp: dict, B_sel=None):
    """float64 reference on the GPU (optionally for a subset of requests)."""
    q, cache, table, lens = inp["q"], inp["kv_cache"], inp["page_table"], inp["cache_seqlens"]
    if B_sel is not None:
        q, table, lens = q[B_sel], table[B_sel], lens[B_sel]
    B, Q, H, _ = q.shape
    dv = inp["head_dim_v"]
    out = torch.empty((B, Q, H, dv), dtype=torch.float64, device=q.device)
    lse = torch.empty((B, Q, H), dtype=torch.float64, device=q.device)
    SPEC.reference(q.double(), cache.double(), table, lens, out, lse, inp["softmax_scale"],
                   head_dim_v=dv, kv_scale=inp["kv_scale"])
    return out, lse


def compare(out, lse, ref_out, ref_lse, dtype) -> tuple[bool, str]:
    atol, rtol = SPEC.tolerance(dtype)
    msgs = []
    ok = True
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse)):
        g = got.double()
        if not torch.isfinite(g).all():
            ok = False
            msgs.append(f"{name}: {int((~torch.isfinite(g)).sum())} non-finite (unwritten?)")
            continue
        err = (g - ref).abs()
        bad = err > atol + rtol * ref.abs()
        rel = (err.norm() / ref.norm().clamp_min(1e-30)).item()
        if bad.any():
            ok = False
            msgs.append(f"{name}: {int(bad.sum())} elems out of tol, max err {err.max().item():.3g}")
        else:
            msgs.append(f"{name} rel {rel:.2e}")
    return ok, "; ".join(msgs)


def run_triton(inp, out, lse, config=None, num_splits=None, policy=None):
    TK.mla_decode_triton(inp["q"], inp["kv_cache"], inp["page_table"], inp["cache_seqlens"], out, lse,
                         inp["softmax_scale"], head_dim_v=inp["head_dim_v"], kv_scale=inp["kv_scale"],
                         config=config, num_splits=num_splits, policy=policy)


# -- the conformance kit's full grid for one tiling policy (one worker process each) -----------
def _kit_check(job: tuple[str, str]) -> dict:
    """``check_backend(..., size="full")`` with the Triton implementation pinned to ``policy``
    ("default" = the registered tiling), registry built by hand as in bench/gpu_suite.py."""
    import functools

    import tokenspeed_core
    from tokenspeed_core.testing import check_backend

    policy, size = job
    from tokenspeed_kernels_triton import plugin

    t = time.time()
    reg = tokenspeed_core.build_registry(entry_points=False)
    fn = TK.mla_decode_triton if policy == "default" else functools.partial(TK.mla_decode_triton, policy=policy)
    with reg.registering_as("triton"):
        reg.register("mla_decode", fn, supports=TK._supports, doc=f"triton mla_decode, policy {policy}",
                     **plugin.common().kwargs())
    try:
        rep = check_backend("mla_decode", "triton", size=size, device=DEV, registry=reg)
        return {"policy": policy, "ok": rep.ok, "counts": rep.counts(), "text": rep.format(verbose=True),
                "s": time.time() - t}
    except Exception as exc:
        return {"policy": policy, "ok": False, "counts": {}, "text": traceback.format_exc()[-3000:],
                "s": time.time() - t, "error": f"{type(exc).__name__}: {exc}"[:300]}


def kit_checks(policies: list[str], size: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(policies)) as pool:
        return pool.map(_kit_check, [(p, size) for p in policies])


# -- correctness over the full grid (worker processes) ----------------------------------------
def _check_cases(args) -> list[dict]:
    idxs, size = args
    import tokenspeed_core
    from tokenspeed_kernels_triton import plugin

    # register this module by hand (other op modules of the package are not under test here)
    reg = tokenspeed_core.build_registry(entry_points=False)
    with reg.registering_as("triton"):
        TK.register(reg, plugin.common())
    cases = SPEC.grid(size)
    res = []
    for i in idxs:
        case = cases[i]
        label = SPEC.label(case)
        try:
            gen = torch.Generator().manual_seed(1000 + i)
            inp = SPEC.make_inputs(case, gen, torch.device(DEV))
            B, Q, H, _ = inp["q"].shape
            out = torch.full((B, Q, H, inp["head_dim_v"]), float("nan"), dtype=inp["q"].dtype, device=DEV)
            lse = torch.full((B, Q, H), float("nan"), dtype=torch.float32, device=DEV)
            with tokenspeed_core.use_backend(mla_decode="triton"):
                reg.call("mla_decode", **inp, out=out, lse=lse)
            sync()
            ref_out, ref_lse = reference64(inp)
            ok, msg = compare(out, lse, ref_out, ref_lse, inp["q"].dtype)
            # the same case with a forced split count, to cover the combine path everywhere
            out2 = torch.full_like(out, float("nan"))
            lse2 = torch.full_like(lse, float("nan"))
            run_triton(inp, out2, lse2, num_splits=5)
            ok2, msg2 = compare(out2, lse2, ref_out, ref_lse, inp["q"].dtype)
            res.append({"case": label, "ok": ok and ok2, "msg": msg + " | splits=5: " + msg2})
        except Exception as exc:  # report, do not stop the grid
            res.append({"case": label, "ok": False, "msg": f"{type(exc).__name__}: {exc}"[:400]})
    return res


def check_grid(size: str, workers: int) -> list[dict]:
    n = len(SPEC.grid(size))
    chunks = [(list(range(w, n, workers)), size) for w in range(workers)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        parts = pool.map(_check_cases, chunks)
    return [r for p in parts for r in p]


# -- benchmark inputs built on the GPU (the spec's CPU generator is too slow at 64K x 128) ------
def gpu_inputs(case: dict, seed: int = 0) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    B, Q, H, ps = case["B"], case.get("q_len", 1), case["H"], case["page_size"]
    s = case["seqlen"]
    dtype = case["dtype"]
    cdt = case.get("cache_dtype", dtype)
    pages = math.ceil(s / ps)
    P = B * pages + 3
    if cdt == torch.float8_e4m3fn:
        kv_scale = 0.05
        cache = (torch.randn((P, ps, 576), generator=g, device=DEV) / kv_scale).to(cdt)
    else:
        kv_scale = 1.0
        cache = torch.randn((P, ps, 576), generator=g, device=DEV, dtype=cdt)
    perm = torch.randperm(P, generator=g, device=DEV).to(torch.int32)
    table = perm[: B * pages].reshape(B, pages).contiguous()
    return {
        "q": torch.randn((B, Q, H, 576), generator=g, device=DEV, dtype=dtype),
        "kv_cache": cache, "page_table": table,
        "cache_seqlens": torch.full((B,), s, dtype=torch.int32, device=DEV),
        "softmax_scale": 1.0 / math.sqrt(192), "head_dim_v": 512, "kv_scale": kv_scale,
    }


def bench_case(case: dict, config=None, spot_check=True, num_splits=None, graph=False, policy=None,
               inp=None) -> dict:
    inp = inp or gpu_inputs(case)
    B, Q, H, _ = inp["q"].shape
    inp["cache_seqlens"].fill_(case["seqlen"])
    out = torch.full((B, Q, H, 512), float("nan"), dtype=inp["q"].dtype, device=DEV)
    lse = torch.full((B, Q, H), float("nan"), dtype=torch.float32, device=DEV)
    fn = lambda: run_triton(inp, out, lse, config=config, num_splits=num_splits, policy=policy)  # noqa: E731
    fn()
    sync()
    row = {}
    if spot_check:
        sel = torch.tensor(sorted({0, B - 1}), device=DEV)
        ref_out, ref_lse = reference64(inp, sel)
        ok, msg = compare(out[sel], lse[sel], ref_out, ref_lse, inp["q"].dtype)
        row.update(ok=ok, check=msg)
    ms = do_bench(fn, rep=100)
    if graph and DEV == "cuda":
        # decode runs under CUDA graphs: time the replay too (no Python launch cost), and prove
        # the captured graph is right for other lengths (the plan never read the values)
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(g, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        row["graph_us"] = do_bench(g.replay, rep=100) * 1e3
        lens = inp["cache_seqlens"]
        lens.copy_(torch.randint(Q, int(lens.max()) + 1, lens.shape, device=DEV, dtype=torch.int32))
        out.fill_(float("nan"))
        g.replay()
        sync()
        sel = torch.tensor(sorted({0, B - 1}), device=DEV)
        ref_out, ref_lse = reference64(inp, sel)
        ok, msg = compare(out[sel], lse[sel], ref_out, ref_lse, inp["q"].dtype)
        row["graph_ok"] = ok
        if not ok:
            row["graph_check"] = msg
        del g
    s = case["seqlen"]
    row_bytes = 576 * inp["kv_cache"].element_size()
    nbytes = B * s * row_bytes + inp["q"].numel() * inp["q"].element_size() + out.numel() * out.element_size()
    flops = 2.0 * B * Q * H * s * (576 + 512)
    cfg = config or TK.pick_config(Q * H, inp["q"].dtype, inp["kv_cache"].dtype, policy)
    rows = Q * H
    mb = math.ceil(rows / cfg.block_m) * (2 if cfg.dv_halves else 1)
    splits = num_splits or TK.plan_splits(B, mb, inp["page_table"].shape[1] * inp["kv_cache"].shape[1],
                                          cfg.block_n, TK.sm_count(torch.device(DEV)) * cfg.ctas_per_sm,
                                          rows=rows, dv=512, row_bytes=row_bytes)
    row.update(us=ms * 1e3, GBps=nbytes / ms / 1e6, TFLOPs=flops / ms / 1e9, config=cfg.describe(),
               splits=splits)
    return row


def device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)"


def load_anchors() -> dict:
    name = device_name()
    fname = "mla-decode-h200.md" if "H200" in name else "mla-decode-h100.md"
    for base in (os.path.join(ROOT, ".bench_anchors"), "/work/shared/anchors"):
        path = os.path.join(base, fname)
        if os.path.exists(path):
            break
    else:
        return {}
    table = {}
    for line in open(path):
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 10 and parts[0].isdigit():
            b, s, h, ql = map(int, parts[:4])
            table[(b, s, h, ql)] = {"flashmla_us": float(parts[4]), "sglang_us": float(parts[7])}
    return table


def _T(bh, w, st=2):
    return TK.Config(bh, 64, w, st, transposed=True)


BASE16, BASE64 = TK.Config(16, 32, 4, 2, ctas_per_sm=2), TK.Config(64, 64, 8, 2)
SHAPES = {
    "mem": dict(B=64, q_len=1, H=16, page_size=64, seqlen=16384, dtype=torch.bfloat16),
    "mem128": dict(B=128, q_len=1, H=16, page_size=64, seqlen=16384, dtype=torch.bfloat16),
    "spec1": dict(B=8, q_len=1, H=16, page_size=64, seqlen=81920, dtype=torch.bfloat16),
    "spec4": dict(B=8, q_len=4, H=16, page_size=64, seqlen=81920, dtype=torch.bfloat16),
    "comp": dict(B=16, q_len=1, H=128, page_size=64, seqlen=16384, dtype=torch.bfloat16),
    "lat": dict(B=1, q_len=1, H=128, page_size=64, seqlen=65536, dtype=torch.bfloat16),
    "fp8": dict(B=64, q_len=1, H=16, page_size=64, seqlen=16384, dtype=torch.bfloat16,
                cache_dtype=torch.float8_e4m3fn),
}
# round 4 run 1 (H200): the transposed kernel, and ablations of the 64-row tile
SWEEP_T = {
    "mem": [None, _T(16, 4), _T(16, 8), _T(16, 4, 3), TK.Config(16, 64, 4, 3)],
    "spec1": [None, _T(16, 4), _T(16, 8), TK.Config(16, 64, 4, 3)],
    # ablations answer "why is q_len 4 1.7x q_len 1": 1 = no PV product, 2 = no QK product
    "spec4": [None, dataclasses.replace(BASE64, ablate=1), dataclasses.replace(BASE64, ablate=2),
              _T(16, 8), _T(32, 8), _T(32, 4), _T(64, 8)],
    "comp": [None, _T(32, 8), _T(32, 4), _T(64, 8)],
    "lat": [None, _T(32, 8), _T(64, 8)],
    "fp8": [None, _T(16, 4), _T(16, 8)],
}
# round 4 run 2: register caps for 3 / 4 programs per SM; 64 rows as 16- or 32-row programs
R168 = TK.Config(16, 32, 4, 2, ctas_per_sm=3, maxnreg=168)
R128 = TK.Config(16, 32, 4, 2, ctas_per_sm=4, maxnreg=128)
# session 5: 16-row tiles of 16 KV rows (sm_90 offline: 128 registers at 3 stages, 140 at 2; 37 KB
# of smem), 4 programs per SM instead of 3 x 32 rows
N16S3 = TK.Config(16, 16, 4, 3, ctas_per_sm=4)
N16R128 = TK.Config(16, 16, 4, 2, ctas_per_sm=4, maxnreg=128)
SWEEP = {
    "mem": [None, R168, R128, N16S3, N16R128],
    "mem128": [None, N16S3, N16R128],
    "spec1": [None, R168, R128],
    "spec4": [None, BASE16, R168, TK.Config(32, 64, 8, 2)],
    "fp8": [None, R168, R128],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--check", default="full", help="grid size to check, or 'none'")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--presets", default="anchor,spec,fp8")
    ap.add_argument("--sweep-only", default="", help="comma list of sweep shapes to run (default all)")
    ap.add_argument("--policies", default="", help="tiling policies to run the kit's grid on")
    ap.add_argument("--kit-size", default="full")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {"device": device_name(), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    result["sm_count"] = TK.sm_count(torch.device(DEV))
    jpath = os.path.join(args.out, "mla_decode.json")

    def save():
        with open(jpath, "w") as f:
            json.dump(result, f, indent=1, default=str)

    t0 = time.time()
    if args.policies:
        res = kit_checks(args.policies.split(","), args.kit_size)
        result["kit"] = res
        for r in res:
            log(f"[kit] policy {r['policy']}: {'PASS' if r['ok'] else 'FAIL'} {r['counts']} in {r['s']:.0f}s "
                f"{r.get('error', '')}")
            if not r["ok"]:
                log(r["text"][-3000:])
            with open(os.path.join(args.out, f"kit-{r['policy']}.txt"), "w") as f:
                f.write(r["text"] + "\n")
        save()
    if args.check != "none":
        res = check_grid(args.check, args.workers)
        result["check"] = res
        bad = [r for r in res if not r["ok"]]
        log(f"[check] {args.check}: {len(res) - len(bad)}/{len(res)} passed in {time.time() - t0:.0f}s")
        for r in bad:
            log("  FAIL", r["case"], r["msg"])
        save()
    ceil = ceilings()
    result["ceilings"] = ceil
    log(f"[ceilings] {result['device']}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 GEMM {ceil['gemm_bf16_TFLOPs']:.0f} TFLOP/s")
    save()

    if args.sweep:
        result["sweep"] = []
        for key, cfgs in SWEEP.items():
            if args.sweep_only and key not in args.sweep_only.split(","):
                continue
            shape = SHAPES[key] if DEV == "cuda" else dict(SHAPES[key], B=1, seqlen=40)
            inp = gpu_inputs(shape)
            for cfg in cfgs:
                try:
                    r = bench_case(shape, config=cfg, graph=True, inp=inp, spot_check=not (cfg and cfg.ablate))
                except Exception as exc:
                    r = {"error": f"{type(exc).__name__}: {exc}"[:300], "config": cfg.describe() if cfg else "default"}
                r.update(shape=key, case=SPEC.label(shape), default=cfg is None)
                if "us" in r:
                    r["pct_copy"] = 100 * r["GBps"] / ceil["copy_GBps"]
                    r["pct_gemm"] = 100 * r["TFLOPs"] / ceil["gemm_bf16_TFLOPs"]
                result["sweep"].append(r)
                log(f"[sweep] {key:<6} {r.get('config'):<22} "
                    + (f"sp={r['splits']:<4} {r['us']:8.1f} us graph {r.get('graph_us', 0):8.1f} us "
                       f"{r['pct_copy']:5.1f}% copy {r['pct_gemm']:5.1f}% gemm ok={r.get('ok')} "
                       f"graph_ok={r.get('graph_ok')}"
                       if "us" in r else r["error"]))
                save()
            del inp
            torch.cuda.empty_cache() if DEV == "cuda" else None
        log(f"\n{result['device']} | copy {ceil['copy_GBps']:.0f} GB/s | GEMM {ceil['gemm_bf16_TFLOPs']:.0f} TFLOP/s")
        log(f"{'shape':<7}{'config':<24}{'spl':>4}{'eager':>9}{'graph':>9}{'%copy':>7}{'%gemm':>7} ok")
        for r in result["sweep"]:
            if "us" in r:
                log(f"{r['shape']:<7}{r['config']:<24}{r['splits']:>4}{r['us']:>9.1f}{r.get('graph_us', 0):>9.1f}"
                    f"{r['pct_copy']:>7.1f}{r['pct_gemm']:>7.1f} {r.get('ok')}/{r.get('graph_ok')}")
            else:
                log(f"{r['shape']:<7}{r['config']:<24} ERROR {r['error'][:80]}")

    anchors = load_anchors()
    rows = []
    seen = set()
    for preset in [p for p in args.presets.split(",") if p]:
        for case in SPEC.presets[preset]:
            key = SPEC.label(case)
            if key in seen:
                continue
            seen.add(key)
            try:
                r = bench_case(case, graph=True)
            except Exception as exc:
                r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                traceback.print_exc()
            r.update(preset=preset, case=key, B=case["B"], s=case["seqlen"], H=case["H"], q_len=case["q_len"],
                     fp8=case.get("cache_dtype") is not None)
            if "us" in r:
                r["pct_copy"] = 100 * r["GBps"] / ceil["copy_GBps"]
                r["pct_gemm"] = 100 * r["TFLOPs"] / ceil["gemm_bf16_TFLOPs"]
                a = anchors.get((case["B"], case["seqlen"], case["H"], case["q_len"]))
                if a and not r["fp8"]:
                    t = r.get("graph_us", r["us"])  # decode runs under graphs; eager kept in "us"
                    r["x_flashmla"] = t / a["flashmla_us"]
                    r["x_sglang"] = t / a["sglang_us"]
                    r["x_flashmla_eager"] = r["us"] / a["flashmla_us"]
            rows.append(r)
            result["rows"] = rows
            save()
    # q_len 4 over q_len 1 at the same shape
    by = {(r["B"], r["s"], r["H"], r["q_len"], r["fp8"]): r for r in rows if "us" in r}
    for r in rows:
        one = by.get((r["B"], r["s"], r["H"], 1, r["fp8"]))
        if "us" in r and r["q_len"] > 1 and one:
            r["x_qlen1"] = r.get("graph_us", r["us"]) / one.get("graph_us", one["us"])
    save()
    log(f"\n{result['device']} | copy {ceil['copy_GBps']:.0f} GB/s | GEMM {ceil['gemm_bf16_TFLOPs']:.0f} TFLOP/s | "
        f"triton {result['triton']} | {time.time() - t0:.0f}s")
    log(f"{'case':<44}{'cfg':<18}{'spl':>4}{'us':>9}{'graph':>8}{'%copy':>7}{'%gemm':>7}{'xFMLA':>7}{'xSGL':>6}{'xq1':>6} ok")
    for r in rows:
        if "us" not in r:
            log(f"{r['case']:<44} ERROR {r.get('error')}")
            continue
        def f(k, r=r):
            return f"{r[k]:.2f}" if k in r else "-"
        g = f"{r['graph_us']:.1f}" if "graph_us" in r else "-"
        log(f"{r['case'][:43]:<44}{r['config']:<18}{r['splits']:>4}{r['us']:>9.1f}{g:>8}{r['pct_copy']:>7.1f}"
            f"{r['pct_gemm']:>7.1f}{f('x_flashmla'):>7}{f('x_sglang'):>6}{f('x_qlen1'):>6} {r.get('ok')}"
            f"{'' if r.get('graph_ok', True) else ' GRAPH-FAIL'}")


if __name__ == "__main__":
    main()
