"""mla_decode's reference against an independent formulation: dense attention over materialised
K/V per query token, in float64, with the mask written as explicit index ranges."""

from __future__ import annotations

import math

import pytest
import torch

import tokenspeed_core as tc
from tokenspeed_core.ops import mla_decode as mla


def dense_mla(q, kv_cache, page_table, lens, scale, dv, kv_scale):
    B, Q, H, D = q.shape
    out = torch.empty(B, Q, H, dv, dtype=torch.float64)
    lse = torch.empty(B, Q, H, dtype=torch.float64)
    ps = kv_cache.shape[1]
    for b in range(B):
        n = int(lens[b])
        k = torch.stack([kv_cache[int(page_table[b, t // ps]), t % ps].double() * kv_scale for t in range(n)])
        for i in range(Q):
            visible = n - Q + i + 1  # the query token itself and everything before it
            for h in range(H):
                s = [float(q[b, i, h].double() @ k[j]) * scale for j in range(visible)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                z = sum(w)
                lse[b, i, h] = m + math.log(z)
                out[b, i, h] = sum(wj / z * k[j, :dv] for j, wj in enumerate(w))
    return out, lse


@pytest.mark.parametrize("case", [
    dict(B=3, q_len=1, H=2, page_size=4, seqlens=[1, 9, 8], D=24, Dv=16),
    dict(B=2, q_len=3, H=3, page_size=8, seqlens=[3, 19], D=24, Dv=16),
    dict(B=1, q_len=2, H=2, page_size=1, seqlens=[6], D=24, Dv=16),
    dict(B=2, q_len=2, H=2, page_size=4, seqlens=[7, 4], D=24, Dv=16, cache_dtype=torch.float8_e4m3fn),
])
def test_reference_matches_dense_attention(case):
    dtype = torch.bfloat16 if case.get("cache_dtype") else torch.float32
    args = mla.SPEC.make_inputs({**case, "dtype": dtype}, torch.Generator().manual_seed(7), "cpu")
    q64 = args["q"].double()
    cache64 = args["kv_cache"].double()
    out = torch.empty(*q64.shape[:3], case["Dv"], dtype=torch.float64)
    lse = torch.empty(q64.shape[:3], dtype=torch.float64)
    mla.reference(q64, cache64, args["page_table"], args["cache_seqlens"], out, lse,
                  args["softmax_scale"], case["Dv"], args["kv_scale"])
    want_out, want_lse = dense_mla(q64, cache64, args["page_table"], args["cache_seqlens"],
                                   args["softmax_scale"], case["Dv"], args["kv_scale"])
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_public_function_allocates_outputs_and_validates():
    args = mla.SPEC.make_inputs(dict(B=2, q_len=1, H=2, page_size=4, seqlens=[3, 5], D=24, Dv=16,
                                     dtype=torch.float32), torch.Generator().manual_seed(0), "cpu")
    out, lse = mla.mla_decode(**args)
    assert out.shape == (2, 1, 2, 16) and lse.dtype == torch.float32
    bad = dict(args, q=args["q"].to(torch.float64))
    with pytest.raises(tc.ArgumentError, match="argument 'q': expected dtype in"):
        mla.mla_decode(**bad)
    with pytest.raises(tc.ArgumentError, match="argument 'kv_cache': expected dtype .*same as 'q'"):
        mla.mla_decode(**dict(args, kv_cache=args["kv_cache"].to(torch.float16)))
    with pytest.raises(tc.ArgumentError, match="argument 'page_table': dim 0 \\(B\\) is 3"):
        mla.mla_decode(**dict(args, page_table=torch.zeros(3, 4, dtype=torch.int32)))
    with pytest.raises(tc.ArgumentError, match="argument 'kv_scale': expected > 0"):
        mla.mla_decode(**dict(args, kv_scale=-1.0))
    with pytest.raises(tc.ArgumentError, match="argument 'softmax_scale': expected a finite float"):
        mla.mla_decode(**dict(args, softmax_scale=float("nan")))
    with pytest.raises(tc.ArgumentError, match="argument 'out': expected a contiguous tensor"):
        mla.mla_decode(**args, out=torch.empty(2, 1, 2, 32)[..., ::2])
    with pytest.raises(tc.ArgumentError, match="argument 'cache_seqlens': expected device cpu"):
        mla.mla_decode(**dict(args, cache_seqlens=args["cache_seqlens"].to("meta")))
