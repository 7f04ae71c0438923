"""Device check of the CuTe sm_90a ``mla_prefill`` kernel: correctness on awkward shapes against
the op's reference in float64, the conformance kit's full grid, graph replay, then the anchor
rows timed against Triton and cuDNN (torch SDPA, the anchor's backend) in the same call and the
GEMM ceiling, and extends over cached prefixes. Run it under ``timeout`` so a hang (a wrong
mbarrier phase after a change) costs seconds:

    source .device/setup.sh && PYTHONUNBUFFERED=1 timeout 300 python bench/gpu_cute_prefill.py

Needs no install (puts the repo and both kernel packages' sources first on sys.path) and calls
the CuTe launcher directly (the conformance kit goes through the registry). Each correctness
case: a fresh random input, ``out`` and ``lse`` poisoned with NaN, each with guard rows past T that must
stay NaN (a stray store shows there). Exit status 1 if any case fails. Details go to
``$OUT/cute_prefill.json``; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "tokenspeed_kernels_triton", "src"), os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src"),
          ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from tokenspeed_core.bench import get_ceilings, time_calls  # noqa: E402
from tokenspeed_core.ops import mla_prefill as op  # noqa: E402

DEV = torch.device("cuda")
GUARD = 3  # poisoned rows past T in out and lse
# (q_lens, prefixes, H): one token, tile boundaries +- 1, an empty request, long prefixes, several
# requests whose tiles straddle each other's rows, prefixes that are not multiples of 128
CASES = [
    ([1], [0], 16), ([1], [1000], 16), ([127], [0], 16), ([128], [0], 16), ([129], [0], 16),
    ([257], [127], 16), ([5, 0, 19], [0, 3, 40], 16), ([130, 0, 1, 300], [0, 64, 4000, 129], 16),
    ([777, 0, 1, 128, 300], [0, 64, 4000, 129, 1000], 16), ([1000], [9000], 16), ([4096], [0], 16),
    ([513, 200, 64], [700, 0, 1], 128), ([33, 9], [7, 0], 128), ([1], [0], 128),
]
# mla-prefill-h100.md's rows (B, S, H; causal, no prefix): cuDNN through torch's SDPA runs in the
# same call as the peer (the anchor's backend); then extends over a cached prefix (q_lens, prefixes,
# H), the agent case no dense SDPA covers
ANCHOR_ROWS = [(1, 8192, 16), (1, 8192, 128), (1, 32768, 16), (1, 32768, 128), (4, 4096, 128), (8, 1024, 128)]
EXTEND_ROWS = [([2048] * 4, [30000] * 4, 128), ([512] * 16, [16000] * 16, 16)]


def inputs(q_lens, prefixes, H, dtype, gen):
    case = dict(H=H, q_lens=q_lens, prefixes=prefixes, dtype=dtype)
    x = op.make_inputs(case, gen, "cpu")
    x = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    T = x["q"].shape[0]
    out_buf = torch.full((T + GUARD, H, 128), float("nan"), device=DEV, dtype=dtype)
    lse_buf = torch.full((T + GUARD, H), float("nan"), device=DEV, dtype=torch.float32)
    return x, out_buf, lse_buf


def check(cp, q_lens, prefixes, H, dtype, gen) -> dict:
    x, out_buf, lse_buf = inputs(q_lens, prefixes, H, dtype, gen)
    T = x["q"].shape[0]
    out, lse = out_buf[:T], lse_buf[:T]
    t0 = time.time()
    cp.mla_prefill(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_kv"], out, lse, x["softmax_scale"])
    torch.cuda.synchronize()
    secs = time.time() - t0
    ro = torch.empty((T, H, 128), device=DEV, dtype=torch.float64)
    rl = torch.empty((T, H), device=DEV, dtype=torch.float64)
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in x.items()}
    op.reference(d["q"], d["k"], d["v"], d["cu_seqlens_q"], d["cu_seqlens_kv"], ro, rl, d["softmax_scale"])
    atol, rtol = op.SPEC.tolerance(dtype)
    o = out.double()
    bad = int((((o - ro).abs() > atol + rtol * ro.abs()) | o.isnan()).sum())
    err_o = (o - ro).abs().nan_to_num(float("inf")).max().item() if T else 0.0
    err_l = (lse.double() - rl).abs().nan_to_num(float("inf")).max().item() if T else 0.0
    guard_ok = bool(out_buf[T:].isnan().all() and lse_buf[T:].isnan().all())
    ok = bad == 0 and err_l < 1e-3 and guard_ok
    return dict(q_lens=q_lens, prefixes=prefixes, H=H, dtype=str(dtype).replace("torch.", ""), max_abs_out=err_o,
                max_abs_lse=err_l, bad=bad, guard_rows_untouched=guard_ok, first_call_s=round(secs, 2), ok=ok)


def graph_replay_matches(cp, gen) -> bool:
    """One call captured in a CUDA graph and replayed gives the eager call's bytes."""
    x, out_buf, lse_buf = inputs([300, 77], [50, 0], 16, torch.bfloat16, gen)
    T = x["q"].shape[0]
    args = (x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_kv"], out_buf[:T], lse_buf[:T], x["softmax_scale"])
    cp.mla_prefill(*args)
    eager = out_buf.clone(), lse_buf.clone()
    out_buf.fill_(float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cp.mla_prefill(*args)
    g.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(out_buf[:T], eager[0][:T]) and torch.equal(lse_buf[:T], eager[1][:T]))


def dense(B, S, H, dtype=torch.bfloat16):
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEV) * S
    return dict(q=torch.randn(B * S, H, 192, device=DEV, dtype=dtype), k=torch.randn(B * S, H, 192, device=DEV, dtype=dtype),
                v=torch.randn(B * S, H, 128, device=DEV, dtype=dtype), cu_seqlens_q=cu, cu_seqlens_kv=cu,
                out=torch.empty(B * S, H, 128, device=DEV, dtype=dtype),
                lse=torch.empty(B * S, H, device=DEV, dtype=torch.float32), softmax_scale=1.0 / math.sqrt(192))


def cudnn_sdpa(x, B, S, H):
    """The anchor's peer: causal SDPA on cuDNN over the same dense rows ([B, H, S, D] views)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x[n].view(B, S, H, -1).transpose(1, 2) for n in ("q", "k", "v"))

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    scale=x["softmax_scale"])
    return run


def conformance() -> dict:
    """The conformance kit's full grid for the CuTe backend (bad inputs included), as a plugin author
    runs it."""
    import tokenspeed_core
    from tokenspeed_core.testing import check_backend
    from tokenspeed_kernels_blackwell import plugin as cute_plugin
    from tokenspeed_kernels_triton import plugin as triton_plugin

    reg = tokenspeed_core.build_registry(entry_points=False)
    for name, plug in (("cute", cute_plugin), ("triton", triton_plugin)):
        with reg.registering_as(name):
            plug.tokenspeed_register_kernels(registry=reg)
    rep = check_backend(op.SPEC.name, "cute", size="full", device="cuda", registry=reg)
    counts = {}
    for r in rep.results:
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.status in ("fail", "error"):
            print(f"  conformance {r.status}: {r.label} :: err={r.max_abs_err} :: {r.detail[:300]}", flush=True)
    return dict(ok=bool(getattr(rep, "ok", False)), counts=counts, text=rep.format(verbose=True))


def extend(q_lens, prefixes, H, dtype=torch.bfloat16):
    """A batch of extends over cached prefixes, made on the device (the CPU generator of the checks
    would take seconds for these sizes)."""
    cu_q = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    cu_kv = torch.tensor([0] + [p + n for p, n in zip(prefixes, q_lens, strict=True)], device=DEV).cumsum(0)
    T, T_kv = sum(q_lens), int(cu_kv[-1])
    return dict(q=torch.randn(T, H, 192, device=DEV, dtype=dtype), k=torch.randn(T_kv, H, 192, device=DEV, dtype=dtype),
                v=torch.randn(T_kv, H, 128, device=DEV, dtype=dtype), cu_seqlens_q=cu_q,
                cu_seqlens_kv=cu_kv.to(torch.int32), out=torch.empty(T, H, 128, device=DEV, dtype=dtype),
                lse=torch.empty(T, H, device=DEV, dtype=torch.float32), softmax_scale=1.0 / math.sqrt(192))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    from tokenspeed_kernels_blackwell import mla_prefill as cp
    from tokenspeed_kernels_triton import mla_prefill as tri

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cute_module": cp.__file__}
    print(info)
    gen = torch.Generator().manual_seed(int(time.time()))
    checks = []
    for dtype in (torch.bfloat16, torch.float16):
        for q_lens, prefixes, H in CASES:
            r = check(cp, q_lens, prefixes, H, dtype, gen)
            checks.append(r)
            print(("ok  " if r["ok"] else "FAIL"), json.dumps(r), flush=True)
    graph_ok = graph_replay_matches(cp, gen)
    print("graph replay == eager:", graph_ok, flush=True)
    conf = conformance()
    print("conformance:", conf["ok"], conf["counts"], flush=True)

    rows = []
    if not args.no_timing:
        ceil = get_ceilings(DEV)
        timed = [(f"B {B} S {S}", dense(B, S, H), B, S, H) for B, S, H in ANCHOR_ROWS]
        timed += [(f"{len(ql)} x q {ql[0]} on {pf[0]}", extend(ql, pf, H), None, None, H)
                  for ql, pf, H in EXTEND_ROWS]
        for label, x, B, S, H in timed:
            flops = 2.0 * H * op.causal_pairs(x["cu_seqlens_q"], x["cu_seqlens_kv"]) * (192 + 128)
            ref_out = x["out"].clone()
            tri.launch(**{**x, "out": ref_out})
            x["out"].fill_(float("nan"))
            cp.mla_prefill(**x)
            torch.cuda.synchronize()
            diff = (x["out"].float() - ref_out.float()).abs().max().item()
            row = dict(row=label, H=H, gflop=flops / 1e9, max_diff_vs_triton=diff, gemm_tflops=ceil.gemm_tflops)
            peers = {"cute": lambda x=x: cp.mla_prefill(**x), "triton": lambda x=x: tri.launch(**x)}
            if B is not None:
                peers["cudnn"] = cudnn_sdpa(x, B, S, H)
            for name, fn in peers.items():
                try:
                    row[f"{name}_us"] = time_calls([fn], DEV, iters=20, max_seconds=5.0).median_us
                except Exception as exc:  # a peer without a kernel for these dims: the row stands without it
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x
            torch.cuda.empty_cache()

    n_ok = sum(r["ok"] for r in checks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cute_prefill.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "graph_replay_ok": graph_ok, "conformance": conf, "rows": rows},
                  f, indent=1)
    print(f"\n{info['device']}: correctness {n_ok}/{len(checks)}, worst out err "
          f"{max(r['max_abs_out'] for r in checks):.3g}, worst lse err {max(r['max_abs_lse'] for r in checks):.3g}, "
          f"graph replay {'ok' if graph_ok else 'MISMATCH'}, conformance {conf['counts']}")
    if rows:
        g = rows[0]["gemm_tflops"]
        print(f"GEMM ceiling {g:.0f} TFLOP/s. µs (TFLOP/s, % of GEMM)")
        print("| row | H | cute | triton | cuDNN | cute / cuDNN | cute / triton |")
        print("|---|---|---|---|---|---|---|")

        def cell(us, gf):
            return f"{us:.1f} ({gf / us * 1e3:.0f}, {gf / us * 1e3 / g * 100:.0f}%)" if us else "-"

        for r in rows:
            c, t, d = r["cute_us"], r["triton_us"], r.get("cudnn_us")
            print(f"| {r['row']} | {r['H']} | {cell(c, r['gflop'])} | {cell(t, r['gflop'])} | {cell(d, r['gflop'])} "
                  f"| {f'{c / d:.3f}x' if c and d else '-'} | {f'{c / t:.3f}x' if c and t else '-'} |")
    return 0 if n_ok == len(checks) and graph_ok and conf["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
