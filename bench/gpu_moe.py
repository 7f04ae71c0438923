"""One GPU call for the Triton moe (written without a GPU; run this first on one):

    PYTHONUNBUFFERED=1 PYTHONPATH=.:tokenspeed_kernels_triton/src python3 bench/gpu_moe.py

1. The conformance kit's full grid on the GPU (fresh inputs, NaN-poisoned output, float64
   reference, bad inputs), the Triton backend forced.
2. DeepSeek-V3 shapes (E 256, top 8 of groups 4/8, Dm 7168, Dff 2048, one shared expert) from
   decode (T 1-64: weight-read bound) to prefill chunks (T 4096, 16384: GEMM bound), each
   checked against the torch reference on the GPU, then timed (do_bench median, L2 flushed)
   beside that reference, as % of the copy ceiling (bytes = the experts the routing touches,
   read once, from the routing of the row's inputs) and of the bf16 GEMM ceiling, both measured
   in the same run. Decode rows also time a few other tilings (``CANDIDATES``).
Writes $OUT/moe.json and prints a table last. If every row passes and the kernel wins, flip
``moe.NOT_YET_ON_GPU`` (it ranks the kernel below the reference until then).
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src")]
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import tokenspeed_core  # noqa: E402
from tokenspeed_core.ops import moe as op  # noqa: E402
from tokenspeed_core.testing import check_backend  # noqa: E402
from tokenspeed_kernels_triton import moe as kernel  # noqa: E402
from tokenspeed_kernels_triton import plugin  # noqa: E402

DEV = torch.device("cuda")
DEEPSEEK = dict(Dm=7168, E=256, Dff=2048, top_k=8, n_group=8, topk_group=4, S=1, Dffs=2048,
                dtype=torch.bfloat16)
TOKENS = (1, 8, 64, 512, 4096, 16384)


def median_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def ceilings() -> dict:
    src = torch.empty(1 << 29, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    gemm = 2 * 8192**3 / (median_ms(lambda: a @ a) * 1e-3) / 1e12
    return {"copy_GBs": copy, "gemm_TFLOPs": gemm}


def routed_bytes(args: dict) -> int:
    """Bytes a perfect kernel must read: the experts some token routes to (each once), the shared
    experts, the activations and the output."""
    ids, _ = op.route(args["router_logits"], args["e_score_correction_bias"], args["top_k"], args["n_group"],
                      args["topk_group"], args["routed_scaling_factor"], args["norm_topk_prob"])
    w13, w2 = args["w13"], args["w2"]
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    other = sum(t.numel() * t.element_size() for t in (args["ws13"], args["ws2"], args["x"], args["x"]))
    return int(ids.unique().numel()) * per_expert + other


# tilings timed beside the default: (BLOCK_M, BLOCK_N up, BLOCK_N down, BLOCK_K, warps, stages)
DECODE_CANDIDATES = ((16, 128, 128, 64, 4, 3), (16, 128, 128, 64, 4, 4), (16, 64, 64, 128, 4, 4),
                     (16, 64, 64, 128, 4, 3), (16, 32, 32, 128, 4, 4), (16, 16, 16, 128, 4, 4),
                     (16, 32, 64, 128, 4, 4))
PREFILL_CANDIDATES = ((128, 64, 128, 64, 8, 3), (64, 128, 128, 64, 8, 4), (128, 128, 128, 64, 8, 3),
                      (64, 64, 128, 64, 4, 4))


def time_row(T: int, gen, ceil: dict) -> dict:
    """One DeepSeek-shaped row: checked against the reference on the GPU, then both timed.

    The router bias is small (as a trained, load-balancing bias is): the spec's test bias
    (std 0.3) funnels random tokens into ~60 experts, which would flatter the kernel."""
    args = op.make_inputs(dict(DEEPSEEK, T=T), gen, DEV)
    args["e_score_correction_bias"] = args["e_score_correction_bias"] * 0.03
    out = torch.full((T, DEEPSEEK["Dm"]), float("nan"), dtype=torch.bfloat16, device=DEV)
    ref = torch.empty_like(out)
    op.reference(**args, out=ref)
    kernel.moe(**args, out=out)
    atol, rtol = op.SPEC.tolerance(torch.bfloat16)
    ok = bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
    cost = op.SPEC.cost(op.SPEC.bind(args))
    nbytes = routed_bytes(args)
    ids, _ = kernel.route_with_shared(args["router_logits"], args["e_score_correction_bias"], DEEPSEEK["top_k"],
                                      DEEPSEEK["n_group"], DEEPSEEK["topk_group"], 2.5, True, DEEPSEEK["E"], 0)
    ref_ids, _ = op.route(args["router_logits"], args["e_score_correction_bias"], DEEPSEEK["top_k"],
                          DEEPSEEK["n_group"], DEEPSEEK["topk_group"], 2.5, True)
    # tokens routed to another set of experts than the op's torch code picks (order aside: an
    # exact tie of scores may come out in either order)
    route_mismatch = int((ids.long().sort(1).values != ref_ids.sort(1).values).any(1).sum())
    t_k = median_ms(lambda: kernel.moe(**args, out=out))
    t_r = median_ms(lambda: op.reference(**args, out=ref))
    g = torch.cuda.CUDAGraph()  # decode runs captured: the routing's small kernels launch at once
    with torch.cuda.graph(g):
        kernel.moe(**args, out=out)
    out.fill_(float("nan"))
    g.replay()
    graph_ok = bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
    t_g = median_ms(g.replay)
    del g
    row = dict(T=T, ok=ok and graph_ok, route_mismatch=route_mismatch, triton_us=1e3 * t_k, graph_us=1e3 * t_g, reference_us=1e3 * t_r,
               bytes=nbytes, graph_pct_copy=100 * nbytes / (t_g * 1e-3) / 1e9 / ceil["copy_GBs"],
               pct_copy=100 * nbytes / (t_k * 1e-3) / 1e9 / ceil["copy_GBs"],
               pct_gemm=100 * cost.flops / (t_k * 1e-3) / 1e12 / ceil["gemm_TFLOPs"])
    candidates = DECODE_CANDIDATES if T <= 64 else PREFILL_CANDIDATES if T >= 4096 else ()
    default = kernel.tile_config
    try:
        for bm, bn_up, bn_down, bk, warps, stages in candidates:  # each checked before it is timed
            cfg = dict(BLOCK_M=bm, BLOCK_N_UP=bn_up, BLOCK_N_DOWN=bn_down, BLOCK_K=bk, num_warps=warps,
                       num_stages=stages)
            name = f"m{bm}n{bn_up}/{bn_down}k{bk}w{warps}s{stages}"
            kernel.tile_config = lambda *a, cfg=cfg: cfg
            try:
                g = torch.cuda.CUDAGraph()  # graph replay: at T 1 the eager call is host-bound
                with torch.cuda.graph(g):
                    kernel.moe(**args, out=out)
                out.fill_(float("nan"))
                g.replay()
                good = bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
                row[name] = round(1e3 * median_ms(g.replay), 1) if good else "WRONG"
                del g
            except Exception as exc:  # e.g. out of shared memory: report, go on
                row[name] = f"{type(exc).__name__}"
    finally:
        kernel.tile_config = default
    return row


def routing_row(T: int, gen) -> dict:
    """Graph time of routing + alignment alone at T tokens: the two fused kernels against the
    torch version (the op's route, the shared expert appended, align_rows_torch)."""
    E, S = DEEPSEEK["E"], DEEPSEEK["S"]
    logits = torch.randn(T, E, generator=gen).mul_(2.0).to(DEV)
    bias = (torch.randn(E, generator=gen) * 0.009).to(DEV)
    k = dict(top_k=8, n_group=8, topk_group=4)
    bm = kernel.tile_config(T * (k["top_k"] + S), E + S, DEEPSEEK["Dff"], DEEPSEEK["Dm"], 132)["BLOCK_M"]

    def fused():
        ids, _ = kernel.route_with_shared(logits, bias, k["top_k"], k["n_group"], k["topk_group"], 2.5, True, E, S)
        return kernel.align_rows(ids, E + S, bm)

    def torch_path():
        ids, w = op.route(logits, bias, k["top_k"], k["n_group"], k["topk_group"], 2.5, True)
        shared = (E + torch.arange(S, device=DEV)).expand(T, S)
        ids = torch.cat([ids, shared], 1)
        torch.cat([w.float(), torch.ones((T, S), device=DEV)], 1)
        return kernel.align_rows_torch(ids, E + S, bm)

    a, b = fused(), torch_path()
    row = dict(T=T, same_layout=bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])))
    for name, fn in (("fused_us", fused), ("torch_us", torch_path)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        row[name] = round(1e3 * median_ms(g.replay), 1)
        del g
    return row


def main() -> int:
    reg = tokenspeed_core.build_registry(entry_points=False)
    with reg.registering_as("triton"):
        plugin.tokenspeed_register_kernels(registry=reg)
    rep = check_backend("moe", "triton", size="full", device="cuda", registry=reg)
    print(rep.format(), flush=True)
    ceil = ceilings()
    print(f"{torch.cuda.get_device_name(0)}: copy {ceil['copy_GBs']:.0f} GB/s, GEMM {ceil['gemm_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in TOKENS:
        rows.append(time_row(T, gen, ceil))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    routing = [routing_row(T, gen) for T in (1, 8, 64, 227)]
    with open(os.path.join(os.environ.get("OUT", "."), "moe.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(0), ceilings=ceil, conformance=rep.format(), rows=rows,
                       routing=routing), f, indent=1)
    print("| T | ok (tokens routed otherwise) | Triton µs | graph µs | reference µs | speed-up | GB read | % copy | "
          "graph % copy | % GEMM |")
    for r in rows:
        print(f"| {r['T']} | {r['ok']} ({r['route_mismatch']}) | {r['triton_us']:.1f} | {r['graph_us']:.1f} | {r['reference_us']:.1f} | "
              f"{r['reference_us'] / r['triton_us']:.2f}x | {r['bytes'] / 1e9:.2f} | {r['pct_copy']:.1f} | "
              f"{r['graph_pct_copy']:.1f} | {r['pct_gemm']:.1f} |")
    for r in rows:
        alts = {k: v for k, v in r.items() if k.startswith("m") and k[1].isdigit()}
        if alts:
            print(f"T {r['T']} tilings, graph µs (default {r['graph_us']:.1f}): {alts}")
    print("routing + alignment alone, graph µs (fused kernels vs torch ops):", routing)
    return 0 if rep.ok and all(r["ok"] for r in rows) and all(r["same_layout"] for r in routing) else 1


if __name__ == "__main__":
    sys.exit(main())
