"""``mla_prefill``: ragged causal extend attention (DeepSeek MLA prefill, un-absorbed).

Requests are packed along the token axis. Request b owns query rows
``cu_seqlens_q[b] : cu_seqlens_q[b+1]`` (``q_len_b`` new tokens) and key/value rows
``cu_seqlens_kv[b] : cu_seqlens_kv[b+1]`` (``kv_len_b`` = a cached prefix followed by the same new
tokens, so ``prefix_b = kv_len_b - q_len_b >= 0``). Query i of request b sits at position
``prefix_b + i`` and attends to kv positions ``0 .. prefix_b + i`` (causal with the prefix offset):

    scores = (q . k) * softmax_scale     out = softmax(scores) @ v     (per head)
    lse    = logsumexp(scores)   (natural log, float32)

Heads are independent (no grouping: after MLA's up-projection every head has its own k and v).
DeepSeek-V3 shapes: Dqk = 192 (128 nope + 64 rope), Dv = 128; H = 128 (16 per GPU at TP 8).
Contract (not checked: it would need a host sync): cu_seqlens_* start at 0, never decrease, end
at T and T_kv; kv_len_b >= q_len_b. A request with q_len_b = 0 writes nothing.
"""

from __future__ import annotations

import math

import torch

from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole
from ._common import ATTENTION_TOL, nbytes, randn

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# the reference materialises scores one query chunk at a time: at most this many per chunk
_REF_SCORES_PER_CHUNK = 1 << 26


def reference(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, softmax_scale):
    """The meaning of mla_prefill; computes in float32, or float64 for float64 inputs."""
    H = q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    for b in range(len(cq) - 1):
        q0, n_q = cq[b], cq[b + 1] - cq[b]
        k0, n_kv = ck[b], ck[b + 1] - ck[b]
        if n_q == 0:
            continue
        prefix = n_kv - n_q
        kb = k[k0 : k0 + n_kv].to(acc)  # [n_kv, H, Dqk]
        vb = v[k0 : k0 + n_kv].to(acc)  # [n_kv, H, Dv]
        kv_pos = torch.arange(n_kv, device=q.device)
        chunk = max(1, _REF_SCORES_PER_CHUNK // max(1, H * n_kv))
        for c0 in range(0, n_q, chunk):
            c1 = min(n_q, c0 + chunk)
            qb = q[q0 + c0 : q0 + c1].to(acc)  # [c, H, Dqk]
            scores = torch.einsum("qhd,khd->hqk", qb, kb) * softmax_scale
            q_pos = prefix + torch.arange(c0, c1, device=q.device)
            scores.masked_fill_((kv_pos[None, :] > q_pos[:, None])[None], float("-inf"))
            lse_c = torch.logsumexp(scores, dim=-1)  # [H, c]
            probs = torch.exp(scores - lse_c[..., None])
            out[q0 + c0 : q0 + c1].copy_(torch.einsum("hqk,khd->qhd", probs, vb).to(out.dtype))
            lse[q0 + c0 : q0 + c1].copy_(lse_c.t().to(lse.dtype))


def _check_values(call: BoundCall) -> None:
    from .._errors import ArgumentError

    dqk, dv = call.dims["Dqk"], call.dims["Dv"]
    if dqk < 1:
        raise ArgumentError("mla_prefill", "q", "head dim Dqk (dim 2) must be >= 1")
    if not 0 < dv <= dqk:
        raise ArgumentError("mla_prefill", "v", f"value head dim Dv={dv} must be in (0, Dqk={dqk}]")
    if call.dims["B1"] < 1:
        raise ArgumentError("mla_prefill", "cu_seqlens_q", "needs B+1 >= 1 entries (it starts with 0)")


def _lengths(case, key: str, plural: str, default: int, B: int, gen: torch.Generator) -> list[int]:
    """Per-request lengths: an explicit list ``case[plural]``, or ``case[key]`` for every request
    (ragged: the first request gets the maximum, the others a random value in [1, max])."""
    if plural in case:
        return list(case[plural])
    hi = case.get(key, default)
    if not case.get("ragged", False) or B == 0:
        return [hi] * B
    lens = torch.randint(1 if hi > 0 else 0, hi + 1, (B,), generator=gen).tolist()
    lens[0] = hi
    return lens


def make_inputs(case, gen, device):
    H, Dqk, Dv = case["H"], case.get("Dqk", 192), case.get("Dv", 128)
    dtype = case["dtype"]
    B = case.get("B", len(case.get("q_lens", ())))
    q_lens = _lengths(case, "q_len", "q_lens", 1, B, gen)
    prefixes = _lengths(case, "prefix", "prefixes", 0, B, gen)
    if len(q_lens) != B or len(prefixes) != B:
        raise ValueError(f"case {case}: B={B} but {len(q_lens)} q_lens and {len(prefixes)} prefixes")
    kv_lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    cu_q = [0]
    cu_kv = [0]
    for n, m in zip(q_lens, kv_lens, strict=True):
        cu_q.append(cu_q[-1] + n)
        cu_kv.append(cu_kv[-1] + m)
    T, T_kv = cu_q[-1], cu_kv[-1]
    return {
        "q": randn((T, H, Dqk), dtype, gen, device),
        "k": randn((T_kv, H, Dqk), dtype, gen, device),
        "v": randn((T_kv, H, Dv), dtype, gen, device),
        "cu_seqlens_q": torch.tensor(cu_q, dtype=torch.int32, device=device),
        "cu_seqlens_kv": torch.tensor(cu_kv, dtype=torch.int32, device=device),
        "softmax_scale": case.get("softmax_scale", 1.0 / math.sqrt(Dqk)),
    }


def causal_pairs(cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor) -> int:
    """Number of (query, key) pairs attended: sum_b q_len*prefix + q_len*(q_len+1)/2."""
    q_lens = cu_seqlens_q.diff().to("cpu", torch.int64)
    prefixes = cu_seqlens_kv.diff().to("cpu", torch.int64) - q_lens
    return int((q_lens * prefixes + q_lens * (q_lens + 1) // 2).sum())


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    H, Dqk = t["q"].shape[1], t["q"].shape[2]
    Dv = t["v"].shape[2]
    pairs = causal_pairs(t["cu_seqlens_q"], t["cu_seqlens_kv"])
    flops = 2.0 * H * (Dqk + Dv) * pairs
    bytes_ = nbytes(t["q"], t["k"], t["v"], t["out"], t["lse"], t["cu_seqlens_q"], t["cu_seqlens_kv"])
    return Cost(flops, bytes_)


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        # awkward: one token, no prefix, an empty request in a batch, lengths off 16/64/128
        # multiples, non power-of-two head dims (48 = 32 + 16, as 192 = 128 + 64) and the real ones
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [
                dict(H=1, Dqk=48, Dv=32, q_lens=[1], prefixes=[0], dtype=dtype),
                dict(H=2, Dqk=48, Dv=32, q_lens=[5, 0, 19], prefixes=[0, 3, 40], dtype=dtype),
                dict(H=2, Dqk=48, Dv=32, q_lens=[70, 1], prefixes=[0, 130], dtype=dtype),
                dict(H=2, Dqk=192, Dv=128, q_lens=[33, 9], prefixes=[7, 0], dtype=dtype),
            ]
        cases += [
            dict(H=3, Dqk=24, Dv=24, q_lens=[17, 2, 0], prefixes=[20, 0, 5], dtype=torch.float32),
            dict(H=2, Dqk=48, Dv=32, q_lens=[], prefixes=[], dtype=torch.bfloat16),
            # the scale's sign is part of the meaning (a kernel may take the max before scaling);
            # zero gives uniform weights next to causally masked scores
            dict(H=2, Dqk=48, Dv=32, q_lens=[9, 3], prefixes=[4, 0], dtype=torch.float32, softmax_scale=-0.3),
            dict(H=2, Dqk=48, Dv=32, q_lens=[9, 3], prefixes=[4, 0], dtype=torch.float32, softmax_scale=0.0),
        ]
    else:
        for dtype in (torch.bfloat16, torch.float16):
            cases += [
                dict(H=16, q_lens=[1], prefixes=[0], dtype=dtype),
                dict(H=16, q_lens=[777, 0, 1, 128, 300], prefixes=[0, 64, 4000, 129, 1000], dtype=dtype),
                dict(B=1, H=16, q_len=4096, prefix=0, dtype=dtype),
                dict(B=1, H=16, q_len=1000, prefix=9000, dtype=dtype),
                dict(B=4, H=16, q_len=1500, prefix=2500, ragged=True, dtype=dtype),
                dict(B=2, H=128, q_len=513, prefix=700, ragged=True, dtype=dtype),
                dict(B=2, H=16, q_len=300, prefix=129, ragged=True, dtype=dtype, softmax_scale=-0.05),
                dict(B=2, H=16, q_len=300, prefix=129, ragged=True, dtype=dtype, softmax_scale=0.0),
            ]
        cases.append(dict(B=3, H=16, q_len=300, prefix=500, ragged=True, dtype=torch.float32))
    return cases


def _label(case) -> str:
    from .._spec import dtype_name

    if "q_lens" in case:
        n = len(case["q_lens"])
        lens = f"q={case['q_lens']} prefix={case['prefixes']}" if n <= 4 else f"B={n} q<={max(case['q_lens'])}"
    else:
        r = "<=" if case.get("ragged") else "="
        lens = f"B={case['B']} q{r}{case['q_len']} prefix{r}{case.get('prefix', 0)}"
    return (f"{lens} H={case['H']} D={case.get('Dqk', 192)}/{case.get('Dv', 128)} "
            f"{dtype_name(case['dtype'])}" + (f" scale={case['softmax_scale']}" if "softmax_scale" in case else ""))


SPEC = OpSpec(
    name="mla_prefill",
    doc=__doc__,
    inputs=(
        TensorRole("q", ("T", "H", "Dqk"), DTYPES, "queries of the new tokens, packed over requests"),
        TensorRole("k", ("Tkv", "H", "Dqk"), DTYPES, "keys: each request's prefix then its new tokens",
                   same_dtype_as="q"),
        TensorRole("v", ("Tkv", "H", "Dv"), DTYPES, "values, rows as in k", same_dtype_as="q"),
        TensorRole("cu_seqlens_q", ("B1",), (torch.int32,), "query row offsets [B+1], from 0 to T"),
        TensorRole("cu_seqlens_kv", ("B1",), (torch.int32,), "kv row offsets [B+1], from 0 to T_kv"),
    ),
    outputs=(
        TensorRole("out", ("T", "H", "Dv"), DTYPES, "attention output", same_dtype_as="q"),
        TensorRole("lse", ("T", "H"), (torch.float32,), "log-sum-exp of the scaled scores"),
    ),
    params=(
        ScalarParam("softmax_scale", float, "scale applied to q.k"),
    ),
    reference=reference,
    primary="q",
    tolerances=ATTENTION_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("H", "Dqk", "Dv"),
    check_values=_check_values,
    case_label=_label,
    presets={
        "small": [dict(B=2, H=4, Dqk=48, Dv=32, q_len=100, prefix=30, dtype=torch.float32),
                  dict(B=1, H=2, q_len=64, prefix=0, dtype=torch.float32)],
        # the rows of shared/anchors/mla-prefill-h100.md (cuDNN SDPA measured there)
        "long": [dict(B=1, H=h, q_len=s, prefix=0, dtype=torch.bfloat16)
                 for s in (8192, 32768) for h in (16, 128)],
        # an agent turn: a long cached conversation, a few thousand new tokens
        "extend": [dict(B=1, H=h, q_len=2048, prefix=49152, dtype=torch.bfloat16) for h in (16, 128)],
        "batch": [dict(B=8, H=128, q_len=1024, prefix=0, dtype=torch.bfloat16)],
    },
)


def mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_kv, softmax_scale, *, out=None, lse=None):
    """Run the selected mla_prefill kernel. Returns (out, lse)."""
    from .. import get_registry

    return get_registry().call(
        "mla_prefill", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
        softmax_scale=softmax_scale, out=out, lse=lse,
    )
