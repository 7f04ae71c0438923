"""moe: the reference against a per-token loop in float64, the routing rules, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import tokenspeed_core.ops.moe as moe_op
from tokenspeed_core import ArgumentError

SPEC = moe_op.SPEC


def _per_token(inputs):
    """Token by token, expert by expert, with Python sorting for the routing; float64."""
    x = inputs["x"].double()
    T, Dm = x.shape
    logits, bias = inputs["router_logits"].double(), inputs["e_score_correction_bias"].double()
    w13, w2 = inputs["w13"].double(), inputs["w2"].double()
    ws13, ws2 = inputs["ws13"].double(), inputs["ws2"].double()
    k, G, KG = inputs["top_k"], inputs["n_group"], inputs["topk_group"]
    E = logits.shape[1]
    per = E // G
    out = torch.zeros(T, Dm, dtype=torch.float64)

    def mlp(v, a, b):
        F = b.shape[1]
        h = [0.0] * F
        gu = a @ v
        for f in range(F):
            g = float(gu[f])
            h[f] = g / (1 + math.exp(-g)) * float(gu[F + f])
        return b @ torch.tensor(h, dtype=torch.float64)

    for t in range(T):
        s = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        c = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(c[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: -gscore[g])[:KG]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -c[e])[:k]
        w = [s[e] for e in chosen]
        if inputs["norm_topk_prob"]:
            tot = sum(w)
            w = [v / tot for v in w]
        for e, we in zip(chosen, w, strict=True):
            out[t] += we * inputs["routed_scaling_factor"] * mlp(x[t], w13[e], w2[e])
        for j in range(ws13.shape[0]):
            out[t] += mlp(x[t], ws13[j], ws2[j])
    return out


def _reference64(inputs):
    t = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    out = torch.full(t["x"].shape, float("nan"), dtype=torch.float64)
    SPEC.reference(**t, out=out)
    return out


@pytest.mark.parametrize("case", SPEC.grid("small"), ids=SPEC.label)
def test_reference_matches_per_token_loop_float64(case):
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(3), torch.device("cpu"))
    got = _reference64(inputs)
    want = _per_token(inputs)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if case["T"]:
        assert want.abs().mean() > 0.1  # outputs are O(1): the comparison has something to see


def test_bias_steers_selection_but_not_weights():
    case = dict(T=6, Dm=16, E=8, Dff=8, top_k=2, n_group=1, topk_group=1, S=0, dtype=torch.float64)
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(1), "cpu")
    inputs["e_score_correction_bias"] = torch.zeros(8)
    inputs["e_score_correction_bias"][5] = 10.0  # expert 5 is always chosen ...
    ids, w = moe_op.route(inputs["router_logits"], inputs["e_score_correction_bias"], 2, 1, 1, 1.0,
                          norm_topk_prob=False)
    assert (ids == 5).any(dim=1).all()
    s = torch.sigmoid(inputs["router_logits"])
    torch.testing.assert_close(w, s.gather(1, ids))  # ... with its unbiased score as weight


def test_group_limit_excludes_strong_experts_in_weak_groups():
    # 4 groups of 2; group 3 holds the single best expert but the weakest pair
    logits = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 4.0, -9.0]])
    ids, _ = moe_op.route(logits, torch.zeros(8), 2, 4, 1, 1.0)
    assert sorted(ids[0].tolist()) == [0, 1]
    ids, _ = moe_op.route(logits, torch.zeros(8), 2, 4, 2, 1.0)  # groups 0, 1: pair sums 1.46, 1.24
    assert sorted(ids[0].tolist()) == [0, 1]
    ids, w = moe_op.route(logits, torch.zeros(8), 1, 4, 4, 2.5)
    assert ids[0].tolist() == [6] and w[0].item() == pytest.approx(2.5)  # normalised, then scaled


def test_public_function_runs_the_reference():
    case = SPEC.presets["small"][0]
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(0), "cpu")
    out = moe_op.moe(**{k: v for k, v in inputs.items()})
    assert out.shape == inputs["x"].shape and out.dtype == inputs["x"].dtype
    torch.testing.assert_close(out.double(), _reference64(inputs), atol=1e-5, rtol=1e-5)


def _valid():
    case = dict(T=3, Dm=8, E=8, Dff=4, top_k=2, n_group=4, topk_group=2, S=1, dtype=torch.float32)
    return SPEC.make_inputs(case, torch.Generator().manual_seed(0), "cpu")


TENSORS = [r.name for r in SPEC.inputs]


@pytest.mark.parametrize("name", TENSORS + ["out"])
def test_bad_tensors_name_the_argument(name):
    args = {**_valid(), "out": torch.empty(3, 8)}
    t = args[name]
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)[..., ::2]
    variants = {"dtype": t.to(torch.float64), "rank": t.unsqueeze(0), "non-contiguous": wide,
                "device": t.to("meta")}
    if name != "x":  # grow a dim whose size an earlier argument already fixed
        i = 2 if name == "ws13" else 0
        shape = list(t.shape)
        shape[i] += 1
        variants["shape"] = torch.zeros(shape, dtype=t.dtype)
    for what, bad in variants.items():
        with pytest.raises(ArgumentError) as exc:
            moe_op.moe(**{**args, name: bad})
        if what == "device" and name == "x":
            assert "'x'" in str(exc.value)  # x sets the call's device; the next argument is blamed
        else:
            assert exc.value.arg == name, f"{what}: {exc.value}"


@pytest.mark.parametrize("change,arg", [
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(routed_scaling_factor="2"), "routed_scaling_factor"),
    (dict(norm_topk_prob=1), "norm_topk_prob"),
    (dict(w13=torch.zeros(8, 6, 8)), "w13"),
    (dict(ws13=torch.zeros(1, 6, 8)), "ws13"),
    (dict(x=torch.zeros(3, 8, dtype=torch.bfloat16)), "w13"),  # experts must match x's dtype
])
def test_bad_params_and_cross_argument_checks(change, arg):
    with pytest.raises(ArgumentError) as exc:
        moe_op.moe(**{**_valid(), **change})
    assert exc.value.arg == arg, str(exc.value)
