"""``moe``: DeepSeek-V3-style routed mixture of experts with shared experts.

For each token t with hidden state ``x[t]`` and router logits ``router_logits[t]`` (the gate GEMM's
output, kept out of this op so it can run in float32 beside the attention output):

1. scores ``s = sigmoid(router_logits[t])`` [E]; selection scores ``c = s + e_score_correction_bias``.
2. grouped top-k: the E experts form ``n_group`` consecutive groups; a group's score is the sum of
   its two largest ``c`` (its largest when a group holds one expert); the ``topk_group`` best groups
   stay, the other groups' experts are out (``c = -inf``); then the ``top_k`` experts of largest
   ``c`` are chosen. The bias steers the choice only: the weights come from ``s``.
3. weights ``w_j = s[e_j]``; ``norm_topk_prob``: ``w /= sum(w)``; then ``w *= routed_scaling_factor``.
4. ``out[t] = sum_j w_j * expert(e_j, x[t]) + sum_{s < S} shared(s, x[t])``, where
   ``expert(e, x) = w2[e] @ (silu(g) * u)`` with ``[g; u] = w13[e] @ x`` (gate rows first, then up
   rows: w13 is [E, 2*Dff, Dm]) and ``shared`` is the same with ``ws13``/``ws2`` [S, 2*Dffs, Dm] /
   [S, Dm, Dffs]. Shared experts are always added, unweighted.

Computed in float32 (float64 for float64 inputs), cast to the output dtype once.
Ties in expert or group selection have no defined winner (random real inputs have none).
DeepSeek-V3: E = 256, n_group = 8, topk_group = 4, top_k = 8, routed_scaling_factor = 2.5,
norm_topk_prob = True, Dm = 7168, Dff = 2048, S = 1 with Dffs = 2048.
"""

from __future__ import annotations

import torch

from .._errors import ArgumentError
from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole, dtype_name
from ._common import ATTENTION_TOL, FLOATS, nbytes, randn

DTYPES = FLOATS


def _positive(v):
    return None if v > 0 else f"expected > 0, got {v}"


def route(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
          norm_topk_prob=True):
    """(expert ids [T, top_k] int64, weights [T, top_k]) of DeepSeek-V3's grouped top-k routing."""
    T, E = router_logits.shape
    acc = torch.promote_types(router_logits.dtype, torch.float32)
    s = torch.sigmoid(router_logits.to(acc))
    c = s + e_score_correction_bias.to(acc)
    per = E // n_group
    grouped = c.view(T, n_group, per)
    group_score = grouped.topk(min(2, per), dim=-1).values.sum(-1)  # [T, n_group]
    keep_group = torch.zeros_like(group_score, dtype=torch.bool)
    keep_group.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    c = c.masked_fill(~keep_group.repeat_interleave(per, dim=1), float("-inf"))
    ids = c.topk(top_k, dim=-1).indices
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w * routed_scaling_factor


def _mlp(x, w13, w2):
    """SiLU-and-mul MLP of one expert on rows x [n, Dm]: w13 [2*F, Dm], w2 [Dm, F]."""
    gu = x @ w13.t()
    F = w2.shape[1]
    return (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ w2.t()


def reference(x, router_logits, e_score_correction_bias, w13, w2, ws13, ws2, out, top_k, n_group,
              topk_group, routed_scaling_factor, norm_topk_prob=True):
    """The meaning of moe; computes in float32, or float64 for float64 inputs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    y = torch.zeros_like(xa)
    if x.shape[0]:
        ids, w = route(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                       routed_scaling_factor, norm_topk_prob)
        w = w.to(acc)
        for e in ids.unique().tolist():  # each expert once, over the tokens routed to it
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y.index_add_(0, tok, _mlp(xa[tok], w13[e].to(acc), w2[e].to(acc)) * w[tok, slot, None])
        for s in range(ws13.shape[0]):
            y += _mlp(xa, ws13[s].to(acc), ws2[s].to(acc))
    out.copy_(y.to(out.dtype))


def _check_values(call: BoundCall) -> None:
    d, p = call.dims, call.params
    if d["F2"] != 2 * d["F"]:
        raise ArgumentError("moe", "w13", f"dim 1 must be 2 * Dff = {2 * d['F']} (w2 dim 2), got {d['F2']}")
    if d["FS2"] != 2 * d["FS"]:
        raise ArgumentError("moe", "ws13", f"dim 1 must be 2 * Dffs = {2 * d['FS']} (ws2 dim 2), "
                                           f"got {d['FS2']}")
    E = d["E"]
    if E % p["n_group"]:
        raise ArgumentError("moe", "n_group", f"must divide the expert count E={E}, got {p['n_group']}")
    if p["topk_group"] > p["n_group"]:
        raise ArgumentError("moe", "topk_group", f"must be <= n_group={p['n_group']}, got {p['topk_group']}")
    reachable = p["topk_group"] * (E // p["n_group"])
    if p["top_k"] > reachable:
        raise ArgumentError("moe", "top_k", f"must be <= topk_group * E / n_group = {reachable}, got {p['top_k']}")


def make_inputs(case, gen, device):
    T, Dm, E, F = case["T"], case["Dm"], case["E"], case["Dff"]
    S, FS = case.get("S", 1), case.get("Dffs", case["Dff"])
    dtype = case["dtype"]
    # weights ~ 1/sqrt(fan-in): every expert's output is O(1), so tolerances are meaningful
    return {
        "x": randn((T, Dm), dtype, gen, device),
        "router_logits": randn((T, E), torch.float32, gen, device, scale=2.0),
        "e_score_correction_bias": randn((E,), torch.float32, gen, device, scale=0.3),
        "w13": randn((E, 2 * F, Dm), dtype, gen, device, scale=Dm**-0.5),
        "w2": randn((E, Dm, F), dtype, gen, device, scale=F**-0.5),
        "ws13": randn((S, 2 * FS, Dm), dtype, gen, device, scale=Dm**-0.5),
        "ws2": randn((S, Dm, FS), dtype, gen, device, scale=FS**-0.5),
        "top_k": case["top_k"], "n_group": case["n_group"], "topk_group": case["topk_group"],
        "routed_scaling_factor": case.get("scale", 2.5), "norm_topk_prob": case.get("norm", True),
    }


def cost(call: BoundCall) -> Cost:
    t, d, p = call.tensors, call.dims, call.params
    T, Dm, E = d["T"], d["Dm"], d["E"]
    per_expert = 2.0 * Dm * 3 * d["F"]  # gate+up GEMV and down GEMV per token
    per_shared = 2.0 * Dm * 3 * d["FS"]
    flops = T * (p["top_k"] * per_expert + d["S"] * per_shared)
    touched = min(E, T * p["top_k"])  # at best, only the experts some token routes to are read
    expert_bytes = (t["w13"].numel() + t["w2"].numel()) // max(E, 1) * t["w13"].element_size()
    bytes_ = touched * expert_bytes + nbytes(t["ws13"], t["ws2"], t["x"], t["out"], t["router_logits"],
                                             t["e_score_correction_bias"])
    return Cost(flops, bytes_)


def grid(size: str) -> list[dict]:
    base = dict(Dm=64, E=16, Dff=32, top_k=4, n_group=4, topk_group=2)
    if size == "small":
        cases = []
        for dtype in DTYPES:
            cases += [dict(base, T=7, dtype=dtype), dict(base, T=1, S=2, Dffs=48, dtype=dtype)]
        cases += [
            dict(base, T=0, dtype=torch.float32),
            dict(base, T=5, E=8, n_group=8, topk_group=3, top_k=3, dtype=torch.float32),  # 1 per group
            dict(base, T=9, E=12, n_group=1, topk_group=1, top_k=2, S=0, norm=False, dtype=torch.float32),
        ]
        return cases
    return [dict(T=T, Dm=1024, E=64, Dff=256, top_k=8, n_group=8, topk_group=4, Dffs=256, dtype=dtype)
            for T in (1, 33, 512) for dtype in (torch.bfloat16, torch.float16)]


def _label(case) -> str:
    return (f"T={case['T']} Dm={case['Dm']} E={case['E']} Dff={case['Dff']} S={case.get('S', 1)} "
            f"top{case['top_k']} groups {case['topk_group']}/{case['n_group']} {dtype_name(case['dtype'])}")


SPEC = OpSpec(
    name="moe",
    doc=__doc__,
    inputs=(
        TensorRole("x", ("T", "Dm"), DTYPES, "hidden states"),
        TensorRole("router_logits", ("T", "E"), (torch.float32,), "gate GEMM output (pre-sigmoid)"),
        TensorRole("e_score_correction_bias", ("E",), (torch.float32,), "selection bias (not in weights)"),
        TensorRole("w13", ("E", "F2", "Dm"), DTYPES, "routed experts: gate rows then up rows",
                   same_dtype_as="x"),
        TensorRole("w2", ("E", "Dm", "F"), DTYPES, "routed experts: down projection", same_dtype_as="x"),
        TensorRole("ws13", ("S", "FS2", "Dm"), DTYPES, "shared experts: gate rows then up rows",
                   same_dtype_as="x"),
        TensorRole("ws2", ("S", "Dm", "FS"), DTYPES, "shared experts: down projection", same_dtype_as="x"),
    ),
    outputs=(TensorRole("out", ("T", "Dm"), DTYPES, "routed + shared expert output", same_dtype_as="x"),),
    params=(
        ScalarParam("top_k", int, "experts per token", static=True, check=_positive),
        ScalarParam("n_group", int, "expert groups", static=True, check=_positive),
        ScalarParam("topk_group", int, "groups kept per token", static=True, check=_positive),
        ScalarParam("routed_scaling_factor", float, "scale of the routed weights", default=1.0),
        ScalarParam("norm_topk_prob", bool, "renormalise the top-k weights to sum 1", default=True,
                    static=True),
    ),
    reference=reference,
    primary="x",
    tolerances=ATTENTION_TOL,  # two GEMM reductions per expert
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    presets={"small": [dict(T=16, Dm=256, E=16, Dff=128, top_k=4, n_group=4, topk_group=2,
                            dtype=torch.float32)],
             # DeepSeek-V3's layer (11 GB of bf16 experts): decode batches to a prefill chunk
             "large": [dict(T=T, Dm=7168, E=256, Dff=2048, top_k=8, n_group=8, topk_group=4, S=1, Dffs=2048,
                            dtype=torch.bfloat16) for T in (1, 64, 4096)]},
    static_dims=("Dm", "E", "F", "S", "FS"),
    check_values=_check_values,
    case_label=_label,
)


def moe(x, router_logits, e_score_correction_bias, w13, w2, ws13, ws2, *, top_k, n_group, topk_group,
        routed_scaling_factor=1.0, norm_topk_prob=True, out=None):
    """Run the selected moe kernel. Returns out [T, Dm]."""
    from .. import get_registry

    return get_registry().call(
        "moe", x=x, router_logits=router_logits, e_score_correction_bias=e_score_correction_bias,
        w13=w13, w2=w2, ws13=ws13, ws2=ws2, top_k=top_k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor, norm_topk_prob=norm_topk_prob, out=out,
    )
