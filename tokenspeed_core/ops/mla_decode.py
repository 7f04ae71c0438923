"""``mla_decode``: DeepSeek MLA absorbed decode over a paged latent cache.

Each request b has ``cache_seqlens[b]`` tokens in the cache, the last ``q_len`` of which are the
new query tokens (so speculative verification passes q_len > 1). Query i of request b sits at
position ``p = cache_seqlens[b] - q_len + i`` and attends to cache rows 0..p (causal among the new
tokens). A cache row is ``D`` wide: the first ``Dv`` entries are the latent (keys and values share
them), the rest the rotary part (keys only). Row ``t`` of request b lives at
``kv_cache[page_table[b, t // page_size], t % page_size]``.

    scores = (q . row[:D]) * softmax_scale     out = softmax(scores) @ row[:Dv]
    lse    = logsumexp(scores)   (natural log, float32)

With an fp8 e4m3 cache every row is dequantised as ``row * kv_scale``.
DeepSeek-V3 shapes: D = 576, Dv = 512; H = 128 (16 per GPU at TP 8).
Contract: q_len <= cache_seqlens[b] <= page_size * max_pages (not checked: it would need a host
sync); page_table entries past a request's pages are never read.
"""

from __future__ import annotations

import math

import torch

from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole
from ._common import (
    ATTENTION_TOL,
    build_paged_cache,
    gather_paged_rows,
    nbytes,
    ragged_lengths,
    randn,
)

Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def reference(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale, head_dim_v=512,
              kv_scale=1.0):
    """The meaning of mla_decode; computes in float32, or float64 for float64 inputs."""
    B, Q, H, D = q.shape
    Dv = out.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    lens = cache_seqlens.tolist()
    for b in range(B):
        n = int(lens[b])
        rows = gather_paged_rows(kv_cache, page_table[b], n).to(acc) * kv_scale  # [n, D]
        qb = q[b].to(acc)  # [Q, H, D]
        scores = torch.einsum("qhd,nd->qhn", qb, rows) * softmax_scale
        pos = torch.arange(n, device=q.device)
        last = n - Q + torch.arange(Q, device=q.device)  # position of each query token
        mask = pos[None, :] > last[:, None]  # [Q, n]
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)  # [Q, H]
        probs = torch.exp(scores - lse_b[..., None])
        out[b].copy_(torch.einsum("qhn,nd->qhd", probs, rows[:, :Dv]).to(out.dtype))
        lse[b].copy_(lse_b.to(lse.dtype))


def _check_values(call: BoundCall) -> None:
    from .._errors import ArgumentError

    d, dv = call.dims["D"], call.dims["Dv"]
    if not 0 < dv <= d:
        raise ArgumentError("mla_decode", "out", f"value dim Dv={dv} must be in (0, D={d}]")
    cache = call.tensors["kv_cache"]
    q = call.tensors["q"]
    if cache.dtype == torch.float8_e4m3fn:
        if q.dtype == torch.float32:
            raise ArgumentError("mla_decode", "q", "an fp8 cache needs a bf16 or fp16 query")
    elif cache.dtype != q.dtype:
        raise ArgumentError(
            "mla_decode", "kv_cache",
            f"expected dtype {q.dtype} (same as 'q') or float8_e4m3fn, got {cache.dtype}",
        )
    if call.dims["PS"] < 1:
        raise ArgumentError("mla_decode", "kv_cache", "page size (dim 1) must be >= 1")


def make_inputs(case, gen, device):
    B, Q, H = case["B"], case.get("q_len", 1), case["H"]
    D, Dv, ps = case.get("D", 576), case.get("Dv", 512), case["page_size"]
    dtype = case["dtype"]
    cache_dtype = case.get("cache_dtype", dtype)
    if "seqlens" in case:
        lens = list(case["seqlens"])
    else:
        lo = case.get("min_seqlen", max(Q, case["seqlen"] // 2))
        lens = ragged_lengths(B, max(lo, Q), case["seqlen"], gen) if case.get("ragged", True) \
            else [case["seqlen"]] * B
    kv_scale = case.get("kv_scale", 1.0 if cache_dtype != torch.float8_e4m3fn else 0.05)
    # cache values: ~N(0, 1) after dequantisation
    cache, table = build_paged_cache(lens, ps, (D,), cache_dtype, gen, device, scale=1.0 / kv_scale)
    return {
        "q": randn((B, Q, H, D), dtype, gen, device),
        "kv_cache": cache,
        "page_table": table,
        "cache_seqlens": torch.tensor(lens, dtype=torch.int32, device=device),
        "softmax_scale": case.get("softmax_scale", 1.0 / math.sqrt(192)),  # DeepSeek: qk_head_dim 192
        "head_dim_v": Dv,
        "kv_scale": kv_scale,
    }


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    B, Q, H, D = t["q"].shape
    Dv = t["out"].shape[-1]
    total = int(t["cache_seqlens"].sum())
    flops = 2.0 * Q * H * total * (D + Dv)
    row_bytes = D * t["kv_cache"].element_size()
    bytes_ = total * row_bytes + nbytes(t["q"], t["out"], t["lse"], t["cache_seqlens"])
    bytes_ += B * ((total // max(B, 1)) // t["kv_cache"].shape[1] + 1) * 4  # page-table entries read
    return Cost(flops, bytes_)


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        # awkward: length 1, lengths off a page boundary, exactly on one, q_len > 1, ragged batch
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [
                dict(B=1, q_len=1, H=1, page_size=16, seqlens=[1], dtype=dtype),
                dict(B=3, q_len=1, H=16, page_size=16, seqlens=[17, 1, 32], dtype=dtype),
                dict(B=2, q_len=4, H=16, page_size=64, seqlens=[64, 131], dtype=dtype),
                dict(B=2, q_len=2, H=8, page_size=1, seqlens=[5, 2], dtype=dtype),
            ]
        cases += [
            dict(B=2, q_len=3, H=16, page_size=32, seqlens=[100, 33], dtype=torch.bfloat16,
                 cache_dtype=torch.float8_e4m3fn),
            dict(B=0, q_len=1, H=16, page_size=16, seqlens=[], dtype=torch.bfloat16),
            # the scale's sign is part of the meaning: a kernel that takes the max before scaling
            # must handle a negative scale, and zero (uniform weights) next to masked scores
            dict(B=2, q_len=2, H=16, page_size=16, seqlens=[40, 3], dtype=torch.float32, softmax_scale=-0.3),
            dict(B=2, q_len=2, H=16, page_size=16, seqlens=[40, 3], dtype=torch.float32, softmax_scale=0.0),
        ]
    else:
        for dtype in (torch.bfloat16, torch.float16):
            for ps in (1, 16, 32, 64, 128):
                for q_len in (1, 2, 4, 8):
                    cases.append(dict(B=5, q_len=q_len, H=16, page_size=ps, seqlen=777 if ps > 1 else 200,
                                      dtype=dtype))
            cases += [
                dict(B=1, q_len=1, H=128, page_size=64, seqlen=20000, dtype=dtype, ragged=False),
                dict(B=7, q_len=1, H=128, page_size=64, seqlen=3000, dtype=dtype),
                dict(B=3, q_len=4, H=32, page_size=64, seqlen=4100, dtype=dtype),
                # folded rows (q_len x H) not a multiple of the 64-row MMA tile: a padded m-block
                dict(B=3, q_len=3, H=32, page_size=64, seqlen=1500, dtype=dtype),
                dict(B=2, q_len=5, H=16, page_size=128, seqlen=2100, dtype=dtype),
                dict(B=64, q_len=1, H=16, page_size=64, seqlens=[1] * 63 + [4096], dtype=dtype),
                # a negative and a zero scale, at 64 folded rows with causal masking among the queries
                dict(B=3, q_len=4, H=16, page_size=64, seqlen=1500, dtype=dtype, softmax_scale=-0.07),
                dict(B=3, q_len=4, H=16, page_size=64, seqlen=1500, dtype=dtype, softmax_scale=0.0),
            ]
        for q_len in (1, 4, 8):
            cases.append(dict(B=4, q_len=q_len, H=16, page_size=64, seqlen=2049, dtype=torch.bfloat16,
                              cache_dtype=torch.float8_e4m3fn))
        # an fp16 query over an fp8 cache, with a padded m-block, a length-3 request and odd tile
        # counts; 128 heads over pages of 128
        cases += [
            dict(B=3, q_len=3, H=32, page_size=64, seqlens=[1500, 3, 700], dtype=torch.float16,
                 cache_dtype=torch.float8_e4m3fn),
            dict(B=2, q_len=1, H=128, page_size=128, seqlens=[129, 3000], dtype=torch.float16,
                 cache_dtype=torch.float8_e4m3fn),
        ]
    return cases


def _label(case) -> str:
    lens = case.get("seqlens")
    s = f"s={lens}" if lens is not None and len(lens) <= 4 else f"s<={case.get('seqlen', max(lens or [0]))}"
    from .._spec import dtype_name

    cd = case.get("cache_dtype")
    return (f"B={case['B']} q_len={case.get('q_len', 1)} H={case['H']} ps={case['page_size']} {s} "
            f"{dtype_name(case['dtype'])}" + (f" cache={dtype_name(cd)}" if cd else "")
            + (f" scale={case['softmax_scale']}" if "softmax_scale" in case else ""))


def _anchor_rows() -> list[dict]:
    rows = []
    for b in (1, 16, 64, 128):
        for s in (4096, 16384, 65536):
            for h in (16, 128):
                for ql in (1, 4):
                    rows.append(dict(B=b, q_len=ql, H=h, page_size=64, seqlen=s, ragged=False,
                                     dtype=torch.bfloat16))
    return rows


SPEC = OpSpec(
    name="mla_decode",
    doc=__doc__,
    inputs=(
        TensorRole("q", ("B", "Q", "H", "D"), Q_DTYPES, "queries: absorbed latent + rope"),
        TensorRole("kv_cache", ("P", "PS", "D"), CACHE_DTYPES, "paged latent cache [pages, page_size, D]"),
        TensorRole("page_table", ("B", "MP"), (torch.int32,), "page ids of each request"),
        TensorRole("cache_seqlens", ("B",), (torch.int32,), "tokens in cache incl. the q_len new ones"),
    ),
    outputs=(
        TensorRole("out", ("B", "Q", "H", "Dv"), Q_DTYPES, "attention output", same_dtype_as="q"),
        TensorRole("lse", ("B", "Q", "H"), (torch.float32,), "log-sum-exp of the scaled scores"),
    ),
    params=(
        ScalarParam("softmax_scale", float, "scale applied to q.k"),
        ScalarParam("head_dim_v", int, "value (latent) width Dv: the first Dv entries of a row",
                    default=512, static=True, check=lambda v: None if v > 0 else f"expected > 0, got {v}"),
        ScalarParam("kv_scale", float, "dequantisation scale of an fp8 cache", default=1.0,
                    check=lambda v: None if v > 0 else f"expected > 0, got {v}"),
    ),
    reference=reference,
    primary="q",
    tolerances=ATTENTION_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("Q", "H", "D", "Dv", "PS"),
    dim_params={"Dv": "head_dim_v"},
    check_values=_check_values,
    case_label=_label,
    presets={
        "small": [dict(B=2, q_len=1, H=16, page_size=64, seqlen=512, ragged=False, dtype=torch.float32),
                  dict(B=2, q_len=4, H=16, page_size=64, seqlen=512, ragged=False, dtype=torch.float32)],
        "memory": [dict(B=b, q_len=1, H=16, page_size=64, seqlen=s, ragged=False, dtype=torch.bfloat16)
                   for b in (64, 128) for s in (16384, 65536)],
        "compute": [dict(B=b, q_len=ql, H=h, page_size=64, seqlen=16384, ragged=False, dtype=torch.bfloat16)
                    for b in (16, 64) for (h, ql) in ((128, 1), (16, 4), (128, 4))],
        "spec": [dict(B=b, q_len=ql, H=h, page_size=64, seqlen=81920, ragged=False, dtype=torch.bfloat16)
                 for h in (16, 32) for b in (4, 8, 16) for ql in (1, 4)],
        "latency": [dict(B=1, q_len=1, H=h, page_size=64, seqlen=s, ragged=False, dtype=torch.bfloat16)
                    for h in (16, 128) for s in (16384, 65536)],
        "fp8": [dict(B=64, q_len=ql, H=16, page_size=64, seqlen=16384, ragged=False, dtype=torch.bfloat16,
                     cache_dtype=torch.float8_e4m3fn) for ql in (1, 4)],
        "anchor": _anchor_rows(),  # the 48 rows of ../shared/anchors/mla-decode-*.md
    },
)


def mla_decode(q, kv_cache, page_table, cache_seqlens, softmax_scale, *, head_dim_v=512, kv_scale=1.0,
               out=None, lse=None):
    """Run the selected mla_decode kernel. Returns (out, lse)."""
    from .. import get_registry

    return get_registry().call(
        "mla_decode", q=q, kv_cache=kv_cache, page_table=page_table, cache_seqlens=cache_seqlens,
        softmax_scale=softmax_scale, head_dim_v=head_dim_v, kv_scale=kv_scale, out=out, lse=lse,
    )
