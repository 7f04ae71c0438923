"""A quick GPU smoke test of one CuTe mla_decode kernel variant before the long runs: a few shapes
with awkward lengths (1, a tile boundary +- 1, odd tile counts) and forced split counts (1, odd,
more splits than tiles: empty splits), against the op's reference in float64. Meant to run under
``timeout`` first in a device call, so a kernel that hangs costs seconds, not the call.

    source .device/setup.sh && timeout 120 python bench/gpu_cute_smoke.py --variant v5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --src DIR (another checkout's tokenspeed_kernels_blackwell/src, as gpu_cute_ab.py takes) goes first
SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")
for p in (ROOT, os.path.abspath(SRC)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from tokenspeed_core.ops.mla_decode import reference  # noqa: E402


def run_case(md, variant, B, Q, H, lens, splits, dtype=torch.bfloat16, ps=64, gen=None, fp8=False,
             scale=1.0 / math.sqrt(192)):
    dev = "cuda"
    pages = max(1, max(-(-n // ps) for n in lens))
    num_pages = B * pages + 2
    cache = torch.randn((num_pages, ps, 576), generator=gen, device=dev, dtype=dtype)
    cache[-1] = float("nan")  # stale rows of the pages in use are NaN below
    kv_scale = 1.0
    if fp8:  # values ~ N(0, 1 / kv_scale): the dequantised rows are ~ N(0, 1)
        kv_scale = 0.05
        cache = (cache / kv_scale).to(torch.float8_e4m3fn)
    table = torch.randperm(num_pages - 1, device=dev, generator=gen)[: B * pages].view(B, pages).int()
    for b, n in enumerate(lens):  # poison the unused tail of each request's last page
        if n % ps:
            cache[table[b, (n - 1) // ps], n % ps:] = float("nan")
    q = torch.randn((B, Q, H, 576), generator=gen, device=dev, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = torch.full((B, Q, H, 512), float("nan"), device=dev, dtype=dtype)
    lse = torch.full((B, Q, H), float("nan"), device=dev, dtype=torch.float32)
    md.mla_decode(q, cache, table, seqlens, out, lse, scale, 512, kv_scale, variant=variant,
                  num_kv_splits=splits)
    torch.cuda.synchronize()
    ro = torch.empty((B, Q, H, 512), dtype=torch.float64, device=dev)
    rl = torch.empty((B, Q, H), dtype=torch.float64, device=dev)
    reference(q.double(), cache.double(), table, seqlens, ro, rl, scale, kv_scale=kv_scale)
    err_o = (out.double() - ro).abs().max().item()
    same_inf = (lse.double() == rl) & rl.isinf()  # an empty request: -inf on both sides
    err_l = torch.where(same_inf, 0.0, lse.double() - rl).abs().max().item()
    ok = err_o < 2e-2 and err_l < 1e-3 and not out.isnan().any().item()
    return ok, err_o, err_l


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="v5")
    ap.add_argument("--fp8-only", action="store_true", help="only the cases with an fp8 cache")
    ap.add_argument("--src", default="", help="import tokenspeed_kernels_blackwell from this directory")
    args = ap.parse_args()
    from tokenspeed_kernels_blackwell import mla_decode as md

    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    # (B, Q, H, lens, splits[, fp8 cache[, softmax scale[, query dtype]]]); one split: out and lse written by the split kernel
    cases = [
        (1, 1, 128, [1], 1),
        (1, 1, 128, [64], 1),
        (1, 1, 128, [65], 1),
        (1, 1, 128, [200], 1),
        (2, 1, 128, [129, 1000], 1),
        (2, 1, 128, [129, 1000], 3),
        (3, 1, 128, [5, 700, 64 * 9], 40),
        (2, 1, 64, [300, 2048], 4),
        (2, 4, 16, [333, 4000], 5),
        (2, 4, 32, [4000, 81], 7),
        (2, 8, 16, [17, 1500], 2),
        (2, 3, 16, [640, 641], 1),
        (2, 2, 128, [4096, 100], 16),
        (2, 3, 32, [1500, 70], 5),  # 96 folded rows: the second m-block half padding
        (3, 5, 16, [2100, 64, 9], 3),  # 80 rows
        (1, 1, 16, [1], 1),  # <= 32 folded rows: the v4 kernel
        (2, 1, 16, [65, 3000], 4),
        (3, 2, 16, [64, 129, 700], 40),
        (2, 1, 32, [1000, 5], 3),
        (3, 1, 128, [0, 100, 64], 1),  # an empty request: lse -inf, out 0
        (3, 4, 16, [300, 0, 4], 1),
        (3, 1, 16, [0, 5, 640], 1),
        (2, 3, 32, [0, 777], 1),
        (2, 1, 16, [129, 1000], 1, True),  # fp8: kv_scale applied by the split kernel
        (2, 4, 16, [129, 1000], 1, True),
        (2, 4, 32, [129, 1000], 1, True),
        (2, 3, 32, [1500, 70], 1),  # one split, 96 rows: the padded rows of the staged out
        (3, 5, 16, [2100, 64, 9], 1),
        (2, 1, 64, [300, 2048], 1),
        (2, 4, 16, [129, 1000], 3, True),  # fp8 (64 rows), partials staged through smem
        # fp8 above 32 rows (the see-saw kernel's producer converts): odd tile counts (a last step
        # of one tile), many empty splits, an empty request, two m-blocks, an fp16 query
        (1, 1, 128, [129], 1, True),
        (3, 1, 128, [5, 700, 64 * 9], 40, True),
        (3, 1, 128, [0, 100, 64], 1, True),
        (2, 2, 128, [4096, 100], 16, True),
        (2, 3, 32, [1500, 70], 5, True),
        (2, 3, 32, [1500, 70], 1, True, 1.0 / math.sqrt(192), torch.float16),
        (2, 4, 16, [333, 4000], 5, True, -0.07, torch.float16),
        (2, 4, 16, [333, 4000], 5, False, -0.07),  # a negative scale: the launcher negates q
        (2, 4, 32, [4000, 81], 1, False, 0.0),  # zero: uniform weights beside masked scores
        (2, 1, 16, [65, 3000], 4, False, -0.07),  # v4
    ]
    if args.fp8_only:
        cases = [c for c in cases if len(c) > 5 and c[5]]
    t0 = time.time()
    fails = 0
    for B, Q, H, lens, splits, *extra in cases:
        fp8 = bool(extra and extra[0])
        scale = extra[1] if len(extra) > 1 else 1.0 / math.sqrt(192)
        dtype = extra[2] if len(extra) > 2 else torch.bfloat16
        ok, eo, el = run_case(md, args.variant, B, Q, H, lens, splits, dtype=dtype, gen=gen, fp8=fp8, scale=scale)
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} B={B} Q={Q} H={H} lens={lens} splits={splits} fp8={fp8} scale={scale:.3g} "
              f"{str(dtype)[6:]}: "
              f"max|dO|={eo:.2e} max|dLSE|={el:.2e}", flush=True)
    print(f"smoke {args.variant}: {len(cases) - fails}/{len(cases)} ok in {time.time() - t0:.1f}s")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
