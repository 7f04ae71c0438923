"""One GPU call for the Triton moe (written without a GPU; run this first on one):

    PYTHONUNBUFFERED=1 PYTHONPATH=.:tokenspeed_kernels_triton/src python3 bench/gpu_moe.py

1. The conformance kit's full grid on the GPU (fresh inputs, NaN-poisoned output, float64
   reference, bad inputs), the Triton backend forced.
2. DeepSeek-V3 shapes (E 256, top 8 of groups 4/8, Dm 7168, Dff 2048, one shared expert) from
   decode (T 1-64: weight-read bound) to prefill chunks (T 4096, 16384: GEMM bound), each
   checked against the torch reference on the GPU, then timed (do_bench median, L2 flushed)
   beside that reference, as % of the copy ceiling (bytes = the experts the routing touches,
   read once) and of the bf16 GEMM ceiling, both measured in the same run.
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


def time_row(T: int, gen, ceil: dict) -> dict:
    """One DeepSeek-shaped row: checked against the reference on the GPU, then both timed."""
    args = op.make_inputs(dict(DEEPSEEK, T=T), gen, DEV)
    out = torch.full((T, DEEPSEEK["Dm"]), float("nan"), dtype=torch.bfloat16, device=DEV)
    ref = torch.empty_like(out)
    op.reference(**args, out=ref)
    kernel.moe(**args, out=out)
    atol, rtol = op.SPEC.tolerance(torch.bfloat16)
    ok = bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
    cost = op.SPEC.cost(op.SPEC.bind(args))
    t_k = median_ms(lambda: kernel.moe(**args, out=out))
    t_r = median_ms(lambda: op.reference(**args, out=ref))
    return dict(T=T, ok=ok, triton_us=1e3 * t_k, reference_us=1e3 * t_r,
                pct_copy=100 * cost.bytes / (t_k * 1e-3) / 1e9 / ceil["copy_GBs"],
                pct_gemm=100 * cost.flops / (t_k * 1e-3) / 1e12 / ceil["gemm_TFLOPs"])


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
    with open(os.path.join(os.environ.get("OUT", "."), "moe.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(0), ceilings=ceil, conformance=rep.format(), rows=rows), f,
                  indent=1)
    print("| T | ok | Triton µs | reference µs | speed-up | % copy | % GEMM |")
    for r in rows:
        print(f"| {r['T']} | {r['ok']} | {r['triton_us']:.1f} | {r['reference_us']:.1f} | "
              f"{r['reference_us'] / r['triton_us']:.2f}x | {r['pct_copy']:.1f} | {r['pct_gemm']:.1f} |")
    return 0 if rep.ok and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
