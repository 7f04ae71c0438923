"""mla_prefill: the reference against an independent formulation, and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokenspeed_core
from tokenspeed_core import ArgumentError
from tokenspeed_core.ops import mla_prefill as mp

SPEC = mp.SPEC


def _sdpa_per_request(q, k, v, cu_q, cu_kv, scale):
    """Float64 attention through torch SDPA with an explicit boolean mask, one request at a time;
    lse from the masked exponentials summed directly (no max subtraction: scores are O(1))."""
    T, H, _ = q.shape
    out = torch.full((T, H, v.shape[-1]), float("nan"), dtype=torch.float64)
    lse = torch.full((T, H), float("nan"), dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_kv[b]), int(cu_kv[b + 1])
        n_q, n_kv = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        # allowed[i, j]: key j visible to the i-th new token, i.e. j - i <= prefix
        allowed = torch.ones(n_q, n_kv, dtype=torch.bool).tril(diagonal=n_kv - n_q)
        qh, kh, vh = (x.permute(1, 0, 2).double() for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        out[q0:q1] = o.permute(1, 0, 2)
        s = (qh @ kh.transpose(1, 2)) * scale
        lse[q0:q1] = torch.log((torch.exp(s) * allowed).sum(-1)).t()
    return out, lse


def _run_reference(inputs):
    t = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}
    T, H = t["q"].shape[:2]
    out = torch.full((T, H, t["v"].shape[-1]), float("nan"), dtype=torch.float64)
    lse = torch.full((T, H), float("nan"), dtype=torch.float32)
    SPEC.reference(**x64, out=out, lse=lse, softmax_scale=inputs["softmax_scale"])
    return out, lse


@pytest.mark.parametrize("case", [c for c in SPEC.grid("small") if c["dtype"] == torch.float32]
                         + [dict(B=5, H=3, Dqk=40, Dv=16, q_len=37, prefix=90, ragged=True,
                                 dtype=torch.float32)],
                         ids=SPEC.label)
def test_reference_matches_sdpa_float64(case):
    gen = torch.Generator().manual_seed(7)
    inputs = SPEC.make_inputs(case, gen, torch.device("cpu"))
    out, lse = _run_reference(inputs)
    want_out, want_lse = _sdpa_per_request(
        inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_q"], inputs["cu_seqlens_kv"],
        inputs["softmax_scale"],
    )
    assert not out.isnan().any() and not lse.isnan().any(), "reference left rows unwritten"
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)  # lse stored as fp32


def test_reference_chunked_equals_unchunked(monkeypatch):
    """Long requests are computed in query chunks; the chunking must not change the result."""
    case = dict(H=2, Dqk=16, Dv=8, q_lens=[50, 31], prefixes=[13, 0], dtype=torch.float32)
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(3), torch.device("cpu"))
    whole = _run_reference(inputs)
    monkeypatch.setattr(mp, "_REF_SCORES_PER_CHUNK", 2 * 63 * 7)  # chunks of 7 query rows
    chunked = _run_reference(inputs)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunked[1], whole[1], atol=0, rtol=0)


def test_make_inputs_contract():
    case = dict(B=6, H=2, Dqk=16, Dv=8, q_len=20, prefix=50, ragged=True, dtype=torch.bfloat16)
    x = SPEC.make_inputs(case, torch.Generator().manual_seed(1), torch.device("cpu"))
    cq, ck = x["cu_seqlens_q"], x["cu_seqlens_kv"]
    assert cq[0] == 0 and ck[0] == 0 and cq[-1] == x["q"].shape[0] and ck[-1] == x["k"].shape[0]
    assert (ck.diff() >= cq.diff()).all()
    assert x["q"].dtype == torch.bfloat16 and x["q"].float().std() > 0.5  # random, not zeros


def test_cost_counts_causal_pairs():
    case = dict(H=4, Dqk=192, Dv=128, q_lens=[3, 0, 5], prefixes=[10, 2, 0], dtype=torch.float32)
    x = SPEC.make_inputs(case, torch.Generator().manual_seed(1), torch.device("cpu"))
    call = SPEC.bind(x)
    pairs = 3 * 10 + 3 * 4 // 2 + 0 + 5 * 6 // 2
    c = SPEC.cost(call)
    assert c.flops == 2 * 4 * (192 + 128) * pairs
    assert c.bytes >= (x["q"].numel() + x["k"].numel() + x["v"].numel()) * 4


def test_public_function_runs_reference():
    reg = tokenspeed_core.build_registry(entry_points=False)
    case = dict(H=2, Dqk=16, Dv=8, q_lens=[4, 2], prefixes=[3, 0], dtype=torch.float32)
    x = SPEC.make_inputs(case, torch.Generator().manual_seed(2), torch.device("cpu"))
    out, lse = reg.call("mla_prefill", **x)
    want_out, want_lse = _run_reference(x)
    torch.testing.assert_close(out.double(), want_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
    assert callable(mp.mla_prefill)


# -- bad inputs ----------------------------------------------------------------------------------
def _good():
    case = dict(H=2, Dqk=16, Dv=8, q_lens=[4, 2], prefixes=[3, 0], dtype=torch.float16)
    return SPEC.make_inputs(case, torch.Generator().manual_seed(0), torch.device("cpu"))


def _bad_cases():
    meta = torch.device("meta")
    return {
        "q wrong dtype": ("q", lambda x: x.update(q=x["q"].to(torch.int32))),
        "k dtype differs from q": ("k", lambda x: x.update(k=x["k"].float())),
        "v dtype differs from q": ("v", lambda x: x.update(v=x["v"].to(torch.bfloat16))),
        "cu_seqlens_q int64": ("cu_seqlens_q", lambda x: x.update(cu_seqlens_q=x["cu_seqlens_q"].long())),
        "q rank": ("q", lambda x: x.update(q=x["q"][:, 0])),
        "k head count": ("k", lambda x: x.update(k=torch.cat([x["k"], x["k"]], dim=1))),
        "v rows differ from k": ("v", lambda x: x.update(v=x["v"][:-1])),
        "k head dim differs from q": ("k", lambda x: x.update(k=x["k"][..., :-2].contiguous())),
        "cu_seqlens length mismatch": ("cu_seqlens_kv",
                                       lambda x: x.update(cu_seqlens_kv=x["cu_seqlens_kv"][:-1])),
        "k on another device": ("k", lambda x: x.update(k=x["k"].to(meta))),
        "cu_seqlens_kv on another device": ("cu_seqlens_kv",
                                            lambda x: x.update(cu_seqlens_kv=x["cu_seqlens_kv"].to(meta))),
        "q non-contiguous": ("q", lambda x: x.update(q=x["q"].transpose(0, 1).contiguous().transpose(0, 1))),
        "v wider than q": ("v", lambda x: x.update(v=torch.randn(x["v"].shape[0], 2, 32).half())),
        "out wrong dtype": ("out", lambda x: x.update(out=torch.empty(6, 2, 8, dtype=torch.float32))),
        "out wrong shape": ("out", lambda x: x.update(out=torch.empty(6, 2, 16, dtype=torch.float16))),
        "lse wrong dtype": ("lse", lambda x: x.update(lse=torch.empty(6, 2, dtype=torch.float16))),
        "lse on another device": ("lse", lambda x: x.update(lse=torch.empty(6, 2, device=meta))),
        "softmax_scale not finite": ("softmax_scale", lambda x: x.update(softmax_scale=math.inf)),
        "softmax_scale tensor": ("softmax_scale", lambda x: x.update(softmax_scale=torch.tensor(1.0))),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_inputs_name_the_argument(name):
    arg, mutate = _bad_cases()[name]
    x = _good()
    mutate(x)
    with pytest.raises(ArgumentError) as err:
        SPEC.bind(x)
    assert err.value.arg == arg, str(err.value)
    assert f"'{arg}'" in str(err.value)


def test_good_inputs_bind():
    call = SPEC.bind(_good())
    assert call.tensors["out"].shape == (6, 2, 8) and call.tensors["out"].dtype == torch.float16
    assert call.tensors["lse"].dtype == torch.float32
