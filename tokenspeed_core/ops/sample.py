"""``sample``: next-token sampling with temperature, top-k, top-p and min-p, deterministic given seeds.

Inputs per row b of ``logits [B, V]``: ``temperature[b]``, ``top_k[b]``, ``top_p[b]``, ``min_p[b]``,
``seeds[b]`` and ``offsets[b]`` (a per-request step counter). Output: ``out[b]``, a token id (int64,
torch's index type, so it feeds embedding lookups and ``index_select`` without a cast).

Greedy rows: ``temperature[b] <= 0`` → the index of the largest logit; ties go to the LOWEST index.
Filters are not applied (none of them can remove the most probable token).

Sampled rows, in this order (every set below always keeps the most probable token):

1. temperature: ``z_i = (logits_i - max_j logits_j) / temperature``; ``q_i = exp(z_i)`` (so the most
   probable token has q = 1).
2. top-k (on when ``0 < top_k < V``): keep token i iff ``logits_i >= `` the k-th largest logit.
   Ties at the boundary are all kept (so the set may exceed k); exact on the input values.
3. top-p (on when ``top_p < 1``), over the top-k-filtered, renormalised distribution
   ``p_i = q_i / sum_{j in K} q_j``: keep token i iff the mass of the tokens strictly more probable
   than i is ``< top_p`` (or is 0). This is the smallest prefix of the descending order whose mass
   reaches ``top_p``, with ties at the boundary all kept: ``{p_i >= tau}`` for the largest ``tau``
   whose set has mass ``>= top_p``.
4. min-p (on when ``min_p > 0``): keep token i iff ``q_i >= min(min_p, 1)``, i.e.
   ``p_i >= min_p * p_max`` (renormalisation does not change the ratio).
5. the draw, an exponential race over the kept set S: ``out = argmax_{i in S} q_i / E_i`` with
   ``E_i = -log(u_i)``, i.e. ``argmax_{i in S} z_i - log(E_i)`` (Gumbel-max); ties to the lowest
   index. ``P(out = i) = p_i`` restricted to S and renormalised; no sort or cumsum is needed for
   the draw itself.

Randomness is part of the meaning, so any backend reproduces it bit for bit. With 32-bit unsigned
arithmetic (mod 2^32), ``fmix32`` the murmur3 finaliser and ``G = 0x9E3779B9``::

    h = 0x243F6A88
    for w in (seed_lo, seed_hi, offset_lo, offset_hi):       # the 32-bit halves (two's complement)
        h = fmix32(h ^ w) + G
    bits_i = fmix32(fmix32(i * G + h) ^ h)                    # i: the vocabulary index
    u_i = ((bits_i >> 8) + 0.5) / 2^24                        # in (0, 1), exact in float32 below 1/2

Backends differ only by float rounding (exp, log, sums), so ``compare`` accepts a different token
only where the reference's own decision is within rounding: see :func:`compare`.
Contract (not checked, it would need a host sync): every row has at least one finite logit; logits
are finite or -inf (masked tokens); no NaN in any input.
"""

from __future__ import annotations

import torch

from .._errors import ArgumentError
from .._spec import BoundCall, Cost, OpSpec, TensorRole, dtype_name
from ._common import FLOATS, nbytes

LOGIT_DTYPES = FLOATS
MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
HASH_INIT = 0x243F6A88
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35

# compare(): how far a backend computing in float32 may be from the float64 reference.
# The kernel's z_i carries ~3 ulp of |z_i| (subtract, divide), exp/log a few ulp, sums over the row
# ~1 ulp per level: 2^-16 relative (x (1 + |z|)) and 1e-4 of probability mass leave a wide margin
# over that, yet are far below the gap a wrong filter or a different random stream produces.
REL_TOL = 2.0**-16
MASS_TOL = 1e-4


# -- the randomness ----------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits of x * c_hi survive the shift
    return (lo + hi) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_C2)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit key from (seed, offset), int64 tensors [B] -> int64 in [0, 2^32)."""
    h = torch.full_like(seeds, HASH_INIT, dtype=torch.int64)
    for w in (seeds & MASK32, (seeds >> 32) & MASK32, offsets & MASK32, (offsets >> 32) & MASK32):
        h = (fmix32(h ^ w) + GOLDEN) & MASK32
    return h


def random_bits(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """bits[b, i] of the spec: int64 [B, V] holding 32-bit values."""
    h = row_keys(seeds.long(), offsets.long())[:, None]
    i = torch.arange(vocab, dtype=torch.int64, device=seeds.device)[None, :]
    return fmix32(fmix32((i * GOLDEN + h) & MASK32) ^ h)


def exponentials(bits: torch.Tensor) -> torch.Tensor:
    """E = -log(u) in float64, from u = ((bits >> 8) + 0.5) / 2^24 (near u = 1 via log1p)."""
    k = (bits >> 8).to(torch.float64)
    u = (k + 0.5) * 2.0**-24
    v = (2.0**24 - k - 0.5) * 2.0**-24  # 1 - u, exact
    return torch.where(u < 0.5, -torch.log(u), -torch.log1p(-v))


# -- the meaning -------------------------------------------------------------------------------
def _filters(x: torch.Tensor, temperature, top_k, top_p, min_p):
    """z, q and the kept set (bool [B, V]) of the sampled path, in x's dtype."""
    B, V = x.shape
    m = x.max(dim=1, keepdim=True).values
    t = temperature.to(x.dtype)
    t = torch.where(t > 0, t, torch.ones_like(t))[:, None]
    z = (x - m) / t
    q = torch.exp(z)
    # top-k: value >= k-th largest (ties kept); exact on the logits
    k = top_k.long()
    k_on = (k > 0) & (k < V)
    kth = x.sort(dim=1, descending=True).values.gather(1, (k.clamp(1, V) - 1)[:, None])
    keep = ~k_on[:, None] | (x >= kth)
    qk = torch.where(keep, q, torch.zeros_like(q))
    # top-p: mass strictly above each token, via a descending sort with ties grouped
    p_on = top_p.to(x.dtype) < 1
    if bool(p_on.any()):
        qs, order = qk.sort(dim=1, descending=True)
        ps = qs / qs.sum(dim=1, keepdim=True)
        above = ps.cumsum(dim=1) - ps
        pos = torch.arange(V, device=x.device).expand(B, V)
        first = torch.ones_like(qs, dtype=torch.bool)
        first[:, 1:] = qs[:, 1:] != qs[:, :-1]
        group_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
        above_sorted = above.gather(1, group_start)
        mass_above = torch.empty_like(above).scatter_(1, order, above_sorted)
        keep_p = (mass_above < top_p.to(x.dtype)[:, None]) | (mass_above == 0)
        keep &= ~p_on[:, None] | keep_p
    mp = min_p.to(x.dtype)
    keep &= ~(mp > 0)[:, None] | (q >= mp.clamp(max=1)[:, None])
    return z, q, keep


def reference(logits, temperature, top_k, top_p, min_p, seeds, offsets, out):
    """The meaning of sample; float32 arithmetic (float64 for float64 logits), E_i in float64."""
    B, V = logits.shape
    if B == 0:
        return
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    pos = torch.arange(V, device=x.device).expand(B, V)
    m = x.max(dim=1, keepdim=True).values
    greedy_tok = torch.where(x == m, pos, V).min(dim=1).values
    z, _, keep = _filters(x, temperature, top_k, top_p, min_p)
    e = exponentials(random_bits(seeds, offsets, V)).to(acc)
    g = torch.where(keep, z - torch.log(e), torch.full_like(z, float("-inf")))
    gmax = g.max(dim=1, keepdim=True).values
    sampled_tok = torch.where(g == gmax, pos, V).min(dim=1).values
    tok = torch.where(temperature > 0, sampled_tok, greedy_tok)
    out.copy_(tok.to(out.dtype))


# -- comparison within rounding ----------------------------------------------------------------
def acceptable_tokens(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """Per row, the tokens a correct float32 backend may return (bool [B, V], float64 math).

    Greedy rows: exactly the reference's token. Sampled rows: token k is acceptable iff
      * k passes every filter with the thresholds loosened by rounding (top-k exactly; top-p with
        probabilities compared up to a relative REL_TOL*(1+|z|) and mass up to MASS_TOL; min-p up
        to a relative REL_TOL*(1+|z|)), and
      * its race score is within rounding of the best score over the tokens that pass every
        filter even with the thresholds tightened by the same amounts:
        ``g_k >= max_{strict} g - REL_TOL * (4 + |z_k| + |z_best|)``.
    A backend that skips a filter picks tokens outside the loose set; one with other randomness
    picks tokens whose score is far below the best: both fail.
    """
    x = logits.detach().to("cpu", torch.float64)
    B, V = x.shape
    args = [a.detach().to("cpu") for a in (temperature, top_k, top_p, min_p, seeds, offsets)]
    temperature, top_k, top_p, min_p, seeds, offsets = args
    t64, tp, mp = temperature.double(), top_p.double()[:, None], min_p.double()[:, None]
    ok = torch.zeros((B, V), dtype=torch.bool)
    if B == 0:
        return ok
    ref = torch.empty(B, dtype=torch.int64)
    reference(x, t64, top_k, top_p.double(), min_p.double(), seeds, offsets, ref)
    ok[torch.arange(B), ref] = True
    z, q, keep_k = _filters(x, t64, top_k, torch.ones_like(tp[:, 0]), torch.zeros_like(mp[:, 0]))
    rho = REL_TOL * (1 + z.abs().nan_to_num(posinf=0.0, neginf=0.0))
    qk = torch.where(keep_k, q, torch.zeros_like(q))
    p = qk / qk.sum(dim=1, keepdim=True)
    # mass of the kept tokens with q above a threshold, per (row, threshold), via an ascending sort
    qs, order = qk.sort(dim=1)
    suffix = p.gather(1, order).flip(1).cumsum(1).flip(1)  # suffix[j] = mass of sorted[j:]
    suffix = torch.cat([suffix, torch.zeros(B, 1, dtype=suffix.dtype)], dim=1)

    def mass_above(thr):  # mass of tokens with q > thr
        return suffix.gather(1, torch.searchsorted(qs, thr, right=True))

    above_surely = mass_above(qk * (1 + rho))  # tokens certainly more probable
    above_maybe = mass_above(qk * (1 - rho)) - p  # tokens possibly more probable (minus itself)
    p_on = tp < 1
    loose = keep_k & (~p_on | (above_surely < tp + MASS_TOL) | (above_surely == 0))
    strict = keep_k & (~p_on | (above_maybe < tp - MASS_TOL) | (q == 1))  # q == 1: a most probable token
    m_on = mp > 0
    mpc = mp.clamp(max=1)
    loose &= ~m_on | (q >= mpc * (1 - rho))
    strict &= ~m_on | (q >= mpc * (1 + rho)) | (q == 1)
    g = z - torch.log(exponentials(random_bits(seeds, offsets, V)))
    ninf = torch.full_like(g, float("-inf"))
    best = torch.where(strict, g, ninf).max(dim=1, keepdim=True)
    z_best = z.gather(1, best.indices).abs()
    zabs = z.abs().nan_to_num(posinf=0.0, neginf=1e300)
    slack = REL_TOL * (4 + zabs + z_best)
    near = torch.where(loose, g, ninf) >= best.values - slack
    sampled = (t64 > 0)[:, None]
    return ok | (sampled & loose & near)


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, call: BoundCall) -> str | None:
    """Greedy rows exactly; sampled rows within rounding (see :func:`acceptable_tokens`)."""
    out, ref = out.detach().to("cpu"), ref.detach().to("cpu")
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    diff = (out != ref).nonzero().flatten()
    if diff.numel() == 0:
        return None
    t = call.tensors
    V = t["logits"].shape[1]
    rows = diff.to(t["logits"].device)
    sub = {k: t[k].index_select(0, rows) for k in
           ("logits", "temperature", "top_k", "top_p", "min_p", "seeds", "offsets")}
    ok = acceptable_tokens(**sub)
    bad = []
    for j, b in enumerate(diff.tolist()):
        tok = int(out[b])
        if not (0 <= tok < V and bool(ok[j, tok])):
            bad.append(b)
    if not bad:
        return None
    b = bad[0]
    kind = "greedy" if float(t["temperature"][b]) <= 0 else "sampled"
    return (f"{name}: {len(bad)}/{out.numel()} rows pick a token the reference rules out beyond "
            f"rounding; first row {b} ({kind}): {int(out[b])} vs reference {int(ref[b])}")


# -- inputs, cost, grids -----------------------------------------------------------------------
def _check_values(call: BoundCall) -> None:
    if call.dims["V"] < 1:
        raise ArgumentError("sample", "logits", "vocabulary size (dim 1) must be >= 1")


def make_inputs(case, gen, device):
    """LLM-like logits: a broad N(0, 2^2) body plus a few peaked tokens; per-row knobs mixed."""
    B, V, dtype = case["B"], case["V"], case["dtype"]
    mode = case.get("mode", "mixed")
    logits = torch.randn((B, V), generator=gen) * 2.0
    if V > 1:
        n_peak = max(1, min(V // 4, 8))
        peaks = torch.randint(0, V, (B, n_peak), generator=gen)
        logits.scatter_add_(1, peaks, torch.rand((B, n_peak), generator=gen) * 8.0)
    if case.get("masked", False) and V > 4:
        # vocabulary padding (-inf tail) and a grammar mask over ~10% of the rest
        mask = torch.rand((B, V), generator=gen) < 0.1
        mask[:, -(V // 8):] = True
        mask[torch.arange(B), logits.masked_fill(mask, float("-inf")).argmax(1)] = False
        mask[:, 0] = False
        logits = logits.masked_fill(mask, float("-inf"))
    def pick(choices):
        return torch.tensor(choices)[torch.randint(0, len(choices), (B,), generator=gen)]

    temperature = torch.rand(B, generator=gen) * 1.2 + 0.3
    top_k = torch.zeros(B, dtype=torch.int32)
    top_p = torch.ones(B)
    min_p = torch.zeros(B)
    if mode in ("mixed", "filters"):
        top_k = pick([0, 1, 2, 5, 50, V, V + 7, max(1, V // 3)]).to(torch.int32)
        top_p = pick([1.0, 0.95, 0.8, 0.5, 0.1, 0.0])
        min_p = pick([0.0, 0.0, 0.05, 0.3])
        if mode == "filters":  # every filter on in every row
            top_k = torch.randint(1, max(2, V), (B,), generator=gen).to(torch.int32)
            top_p = torch.rand(B, generator=gen) * 0.9 + 0.05
            min_p = torch.rand(B, generator=gen) * 0.2 + 0.01
    if mode in ("mixed", "greedy"):
        greedy = torch.rand(B, generator=gen) < (0.25 if mode == "mixed" else 2.0)
        temperature = torch.where(greedy, torch.zeros_like(temperature), temperature)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen, dtype=torch.int64)
    offsets = torch.randint(0, 2**40, (B,), generator=gen, dtype=torch.int64)
    def to(t):
        return t.to(device)

    return {
        "logits": to(logits.to(dtype)), "temperature": to(temperature.float()), "top_k": to(top_k),
        "top_p": to(top_p.float()), "min_p": to(min_p.float()), "seeds": to(seeds),
        "offsets": to(offsets),
    }


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    B, V = t["logits"].shape
    # ~12 elementwise ops per logit for one pass (scale, exp, hash, log, compare); filter passes
    # re-read the row, but the floor is one read of the logits and the per-row scalars.
    return Cost(12.0 * B * V, nbytes(*t.values()))


def grid(size: str) -> list[dict]:
    if size == "small":
        cases = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [
                dict(B=7, V=1000, dtype=dtype),  # V not a multiple of any block
                dict(B=5, V=513, dtype=dtype, mode="filters"),
            ]
        cases += [
            dict(B=1, V=1, dtype=torch.float32),
            dict(B=3, V=2, dtype=torch.float32, mode="filters"),
            dict(B=6, V=300, dtype=torch.bfloat16, mode="greedy"),  # bf16: ties in the max
            dict(B=4, V=777, dtype=torch.float32, masked=True),
            dict(B=0, V=64, dtype=torch.float32),
            dict(B=9, V=4096, dtype=torch.bfloat16, mode="plain"),
        ]
        return cases
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for B, V in ((1, 129280), (37, 129280), (256, 129280), (64, 32000), (130, 151936)):
            cases.append(dict(B=B, V=V, dtype=dtype))
        cases.append(dict(B=64, V=129280, dtype=dtype, mode="filters"))
        cases.append(dict(B=64, V=129280, dtype=dtype, masked=True))
    return cases


def _label(case) -> str:
    extra = "".join(f" {k}={case[k]}" for k in ("mode", "masked") if k in case)
    return f"B={case['B']} V={case['V']} {dtype_name(case['dtype'])}{extra}"


SPEC = OpSpec(
    name="sample",
    doc=__doc__,
    inputs=(
        TensorRole("logits", ("B", "V"), LOGIT_DTYPES, "next-token logits (finite or -inf)"),
        TensorRole("temperature", ("B",), (torch.float32,), "<= 0: greedy for that row"),
        TensorRole("top_k", ("B",), (torch.int32,), "<= 0 or >= V: off"),
        TensorRole("top_p", ("B",), (torch.float32,), ">= 1: off"),
        TensorRole("min_p", ("B",), (torch.float32,), "<= 0: off"),
        TensorRole("seeds", ("B",), (torch.int64,), "per-request random seed"),
        TensorRole("offsets", ("B",), (torch.int64,), "per-request step counter"),
    ),
    outputs=(TensorRole("out", ("B",), (torch.int64,), "sampled token ids"),),
    params=(),
    reference=reference,
    primary="logits",
    tolerances={d: (0.0, 0.0) for d in LOGIT_DTYPES},  # unused: compare() decides
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    presets={
        "small": [dict(B=4, V=4096, dtype=torch.float32), dict(B=4, V=4096, dtype=torch.float32,
                                                               mode="filters")],
        "large": [dict(B=256, V=129280, dtype=torch.bfloat16),
                  dict(B=256, V=129280, dtype=torch.bfloat16, mode="filters"),
                  dict(B=256, V=129280, dtype=torch.bfloat16, mode="plain"),
                  dict(B=1, V=129280, dtype=torch.bfloat16, mode="filters")],
    },
    static_dims=("V",),
    check_values=_check_values,
    compare=compare,
    case_label=_label,
)


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, *, out=None):
    """Run the selected sample kernel. Returns the token ids (int64 [B])."""
    from .. import get_registry

    return get_registry().call(
        "sample", logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seeds=seeds, offsets=offsets, out=out,
    )
