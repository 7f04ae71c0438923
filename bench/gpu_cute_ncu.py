"""One mla_decode or mla_prefill call shape, run a few times, for a profiler (ncu) to pick a
kernel launch from.

    source .device/setup.sh && ncu --clock-control none -k regex:attention_kernel --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        python bench/gpu_cute_ncu.py --variant v5 --B 16 --q 4 --H 128 --s 16384

    # mla_prefill (dense causal rows of length --s): the kernel is ``prefill_kernel``
    ... ncu ... -k regex:prefill_kernel ... python bench/gpu_cute_ncu.py --op mla_prefill --B 1 --H 16 --s 32768

With ``--src DIR`` the kernels come from another checkout's ``tokenspeed_kernels_blackwell/src``
(an A/B of two builds under the profiler).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="mla_decode", choices=("mla_decode", "mla_prefill"))
    ap.add_argument("--src", default="", help="import tokenspeed_kernels_blackwell from this directory")
    ap.add_argument("--variant", default="v5")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--s", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=4)
    a = ap.parse_args()
    if a.src:  # before the kernel package is first imported (below)
        sys.path.insert(0, a.src)
    if a.op == "mla_prefill":
        return prefill(a)
    from tokenspeed_kernels_blackwell import mla_decode as md

    ps, dev, dt = 64, "cuda", torch.bfloat16
    pages = -(-a.s // ps)
    cache = torch.randn((a.B * pages, ps, 576), device=dev, dtype=dt)
    table = torch.randperm(a.B * pages, device=dev).view(a.B, pages).int()
    q = torch.randn((a.B, a.q, a.H, 576), device=dev, dtype=dt)
    lens = torch.full((a.B,), a.s, dtype=torch.int32, device=dev)
    out = torch.empty((a.B, a.q, a.H, 512), device=dev, dtype=dt)
    lse = torch.empty((a.B, a.q, a.H), device=dev, dtype=torch.float32)
    for _ in range(a.iters):
        md.mla_decode(q, cache, table, lens, out, lse, 1.0 / math.sqrt(192), 512, 1.0, variant=a.variant)
    torch.cuda.synchronize()
    print("done", a)


def prefill(a):
    """B dense causal requests of length s (no prefix), H heads, the DeepSeek dims 192 / 128."""
    from tokenspeed_kernels_blackwell import mla_prefill as mp

    dev, dt, T = "cuda", torch.bfloat16, a.B * a.s
    cu = torch.arange(a.B + 1, dtype=torch.int32, device=dev) * a.s
    q, k = (torch.randn(T, a.H, 192, device=dev, dtype=dt) for _ in range(2))
    v = torch.randn(T, a.H, 128, device=dev, dtype=dt)
    out = torch.empty(T, a.H, 128, device=dev, dtype=dt)
    lse = torch.empty(T, a.H, device=dev, dtype=torch.float32)
    for _ in range(a.iters):
        mp.mla_prefill(q, k, v, cu, cu, out, lse, 1.0 / math.sqrt(192))
    torch.cuda.synchronize()
    print("done", mp.__file__, a)


if __name__ == "__main__":
    main()
