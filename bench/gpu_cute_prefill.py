"""First device check of the CuTe sm_90a ``mla_prefill`` kernel (compiled on CPU, never run before):
correctness on awkward shapes against the op's reference in float64, then a few anchor rows
timed against the Triton kernel and the GEMM ceiling. Run it under ``timeout`` so a hang (a
wrong mbarrier phase) costs seconds:

    source .device/setup.sh && PYTHONUNBUFFERED=1 timeout 300 python bench/gpu_cute_prefill.py

Needs no install (puts the repo and both kernel packages' sources first on sys.path) and calls
the CuTe launcher directly, so TOKENSPEED_CUTE_PREFILL is not needed. Each correctness case: a
fresh random input, ``out`` and ``lse`` poisoned with NaN, each with guard rows past T that must
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
ANCHOR_ROWS = [(1, 8192, 16), (1, 8192, 128), (4, 4096, 128), (8, 1024, 128)]  # B, S, H; prefix 0


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

    rows = []
    if not args.no_timing:
        ceil = get_ceilings(DEV)
        for B, S, H in ANCHOR_ROWS:
            x = dense(B, S, H)
            flops = 2.0 * B * H * (S * (S + 1) / 2) * (192 + 128)
            ref_out = x["out"].clone()
            tri.launch(**{**x, "out": ref_out})
            cp.mla_prefill(**x)
            torch.cuda.synchronize()
            diff = (x["out"].float() - ref_out.float()).abs().max().item()
            t_cute = time_calls([lambda x=x: cp.mla_prefill(**x)], DEV, iters=20, max_seconds=5.0)
            t_tri = time_calls([lambda x=x: tri.launch(**x)], DEV, iters=20, max_seconds=5.0)
            row = dict(B=B, S=S, H=H, cute_us=t_cute.median_us, triton_us=t_tri.median_us, max_diff_vs_triton=diff,
                       cute_tflops=flops / t_cute.median_us / 1e6, triton_tflops=flops / t_tri.median_us / 1e6,
                       gemm_tflops=ceil.gemm_tflops)
            rows.append(row)
            print(json.dumps(row), flush=True)

    n_ok = sum(r["ok"] for r in checks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cute_prefill.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "graph_replay_ok": graph_ok, "rows": rows}, f, indent=1)
    print(f"\n{info['device']}: correctness {n_ok}/{len(checks)}, worst out err "
          f"{max(r['max_abs_out'] for r in checks):.3g}, worst lse err {max(r['max_abs_lse'] for r in checks):.3g}, "
          f"graph replay {'ok' if graph_ok else 'MISMATCH'}")
    if rows:
        print("| B | S | H | cute µs | TFLOP/s (% GEMM) | triton µs | TFLOP/s (% GEMM) | max diff |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = r["gemm_tflops"]
            print(f"| {r['B']} | {r['S']} | {r['H']} | {r['cute_us']:.1f} | {r['cute_tflops']:.0f} "
                  f"({r['cute_tflops'] / g * 100:.0f}%) | {r['triton_us']:.1f} | {r['triton_tflops']:.0f} "
                  f"({r['triton_tflops'] / g * 100:.0f}%) | {r['max_diff_vs_triton']:.3g} |")
    return 0 if n_ok == len(checks) and graph_ok else 1


if __name__ == "__main__":
    sys.exit(main())
