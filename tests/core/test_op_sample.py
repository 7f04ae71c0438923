"""sample: the reference against independent formulations, the tolerant compare, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenspeed_core.ops.sample as sample_op
from tokenspeed_core import ArgumentError

SPEC = sample_op.SPEC
M32 = 0xFFFFFFFF


# -- independent formulations ------------------------------------------------------------------
def _fmix32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _bits_py(seed: int, offset: int, i: int) -> int:
    """The spec's hash in Python's unbounded integers."""
    h = 0x243F6A88
    for w in (seed & M32, (seed >> 32) & M32, offset & M32, (offset >> 32) & M32):
        h = (_fmix32_py(h ^ w) + 0x9E3779B9) & M32
    return _fmix32_py(_fmix32_py((i * 0x9E3779B9 + h) & M32) ^ h)


def _kept_set_sorted(x, temperature, top_k, top_p, min_p):
    """The kept tokens of one row, by walking the descending order in float64 (numpy)."""
    x = np.asarray(x, dtype=np.float64)
    V = len(x)
    z = (x - x.max()) / temperature
    q = np.exp(z)
    order = np.argsort(-x, kind="stable")
    keep = np.ones(V, dtype=bool)
    if 0 < top_k < V:
        last = x[order[top_k - 1]]
        keep[:] = False
        keep[order[:top_k]] = True
        keep |= x == last  # ties with the k-th are kept
    if top_p < 1:
        p = np.where(keep, q, 0.0)
        p /= p.sum()
        order_p = np.argsort(-p, kind="stable")
        cum, chosen = 0.0, np.zeros(V, dtype=bool)
        for n, j in enumerate(order_p):
            if n > 0 and cum >= top_p and p[j] < p[order_p[n - 1]]:
                break
            chosen[j] = True
            cum += p[j]
        keep &= chosen
    if min_p > 0:
        keep &= q / q.max() >= min(min_p, 1.0)
    return keep


def _run(inputs, dtype=None):
    t = dict(inputs)
    if dtype is not None:
        t["logits"] = t["logits"].to(dtype)
    out = torch.full((t["logits"].shape[0],), -1, dtype=torch.int64)
    SPEC.reference(**t, out=out)
    return out


def _inputs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, seeds=0, offsets=0):
    B = logits.shape[0]
    def full(v, dt):
        return v if isinstance(v, torch.Tensor) else torch.full((B,), v, dtype=dt)

    return dict(logits=logits, temperature=full(temperature, torch.float32),
                top_k=full(top_k, torch.int32), top_p=full(top_p, torch.float32),
                min_p=full(min_p, torch.float32), seeds=full(seeds, torch.int64),
                offsets=full(offsets, torch.int64))


# -- the randomness ----------------------------------------------------------------------------
def test_hash_matches_python_integers():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, -987654321]
    offsets = [0, 1, 2**32, 2**40 + 17, 2**62 + 5]
    V = 37
    s = torch.tensor([a for a in seeds for _ in offsets], dtype=torch.int64)
    o = torch.tensor([b for _ in seeds for b in offsets], dtype=torch.int64)
    got = sample_op.random_bits(s, o, V)
    want = torch.tensor([[_bits_py(int(a), int(b), i) for i in range(V)] for a, b in zip(s, o, strict=True)])
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() <= M32


def test_uniforms_pass_kolmogorov_smirnov_and_exponentials_are_exact():
    s = torch.arange(64, dtype=torch.int64) * 7919 - 100
    o = torch.arange(64, dtype=torch.int64) % 5
    bits = sample_op.random_bits(s, o, 1000).flatten()
    u = ((bits >> 8).double() + 0.5) / 2**24
    n = u.numel()
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = (u.sort().values - ecdf).abs().max().item()
    assert d < 1.95 / math.sqrt(n), f"KS distance {d} (n={n}): the hash is not uniform"
    # low bits too (the top 24 feed u, the rest must not be degenerate either)
    assert abs((bits & 0xFF).double().mean().item() - 127.5) < 1.0
    # E = -log(u), including the end near u = 1 where a plain float32 log loses everything
    edge = torch.tensor([0, 1, 2**23 - 1, 2**23, 2**24 - 2, 2**24 - 1], dtype=torch.int64) << 8
    e = sample_op.exponentials(edge)
    for k, val in zip((edge >> 8).tolist(), e.tolist(), strict=True):
        want = -math.log1p(-(2**24 - k - 0.5) / 2**24) if k >= 2**23 else -math.log((k + 0.5) / 2**24)
        assert val == pytest.approx(want, rel=1e-15)


# -- greedy -----------------------------------------------------------------------------------
def test_greedy_is_argmax_with_lowest_index_ties():
    gen = torch.Generator().manual_seed(3)
    B, V = 40, 97
    logits = torch.randint(-3, 4, (B, V), generator=gen).float()  # many ties in the max
    temperature = torch.where(torch.arange(B) % 2 == 0, 0.0, -1.0)
    inputs = _inputs(logits, temperature, top_k=torch.randint(0, V, (B,), generator=gen, dtype=torch.int32),
                     top_p=0.3, min_p=0.5, seeds=torch.arange(B))
    out = _run(inputs)
    want = torch.tensor([int(np.argmax(row.numpy())) for row in logits])  # numpy: first maximum
    assert torch.equal(out, want)
    # bf16 logits: the result is about the bf16 values, ties included
    lb = (torch.randn(B, 4096, generator=gen) * 3).bfloat16()
    out = _run(_inputs(lb, 0.0))
    assert torch.equal(out, torch.tensor([int(np.argmax(r.float().numpy())) for r in lb]))


# -- the filters --------------------------------------------------------------------------------
@pytest.mark.parametrize("integer_logits", [False, True], ids=["continuous", "ties"])
def test_kept_set_matches_sort_based_float64(integer_logits):
    gen = torch.Generator().manual_seed(11)
    B, V = 300, 23
    logits = (torch.randint(-4, 5, (B, V), generator=gen).double() if integer_logits
              else torch.randn(B, V, generator=gen, dtype=torch.float64) * 2)
    temperature = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    top_k = torch.randint(-1, V + 2, (B,), generator=gen, dtype=torch.int32)
    top_p = torch.rand(B, generator=gen, dtype=torch.float64) * 1.2
    min_p = torch.rand(B, generator=gen, dtype=torch.float64) * 0.4 - 0.1
    _, _, keep = sample_op._filters(logits, temperature, top_k, top_p, min_p)
    sizes = []
    for b in range(B):
        want = _kept_set_sorted(logits[b].numpy(), float(temperature[b]), int(top_k[b]),
                                float(top_p[b]), float(min_p[b]))
        assert np.array_equal(keep[b].numpy(), want), f"row {b}"
        sizes.append(int(want.sum()))
    assert min(sizes) == 1 and max(sizes) > V // 2  # the grid exercises tight and loose sets


def test_filter_boundaries_are_inclusive_as_documented():
    """Exact boundaries: q = [0.5, 1, 0.5, 0] so p = [.25, .5, .25, 0], all dyadic."""
    ln2 = math.log(2)
    x = torch.tensor([[-ln2, 0.0, -ln2, float("-inf")]], dtype=torch.float64)
    assert torch.equal(torch.exp(x[0, :3]), torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))

    def kept(**f):
        args = dict(top_k=torch.tensor([0], dtype=torch.int32), top_p=torch.tensor([1.0]),
                    min_p=torch.tensor([0.0]))
        args.update({k: torch.tensor([v], dtype=args[k].dtype) for k, v in f.items()})
        return sample_op._filters(x, torch.tensor([1.0]), args["top_k"], args["top_p"].double(),
                                  args["min_p"].double())[2][0].tolist()

    # the mass above the 0.25 tokens is exactly 0.5: top_p = 0.5 stops before them
    assert kept(top_p=0.5) == [False, True, False, False]
    assert kept(top_p=0.5 + 2**-20) == [True, True, True, False]
    assert kept(top_p=0.0) == [False, True, False, False]  # the most probable token always stays
    # min-p is inclusive: q >= min_p; min_p >= 1 keeps exactly the most probable tokens
    assert kept(min_p=0.5) == [True, True, True, False]
    assert kept(min_p=0.5 + 2**-20) == [False, True, False, False]
    assert kept(min_p=3.0) == [False, True, False, False]
    # top-k ties at the boundary are all kept
    assert kept(top_k=2) == [True, True, True, False]
    assert kept(top_k=1) == [False, True, False, False]


def _expected_distribution(x, temperature, top_k, top_p, min_p):
    keep = _kept_set_sorted(x, temperature, top_k, top_p, min_p)
    q = np.exp((np.asarray(x, np.float64) - np.max(x)) / temperature) * keep
    return q / q.sum()


def _chi2_upper(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty: the chi-square quantile at normal score z (z=4: p ~ 3e-5)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("filters", [
    dict(top_k=0, top_p=1.0, min_p=0.0),
    dict(top_k=5, top_p=1.0, min_p=0.0),
    dict(top_k=0, top_p=0.7, min_p=0.0),
    dict(top_k=0, top_p=1.0, min_p=0.15),
    dict(top_k=8, top_p=0.9, min_p=0.05),
], ids=lambda f: "k{top_k}-p{top_p}-m{min_p}".format(**f))
def test_empirical_distribution_matches_filtered_softmax(filters):
    x = torch.tensor([2.0, 1.5, 1.4, 0.0, -0.5, 1.0, 3.0, 0.2, -2.0, 0.9, 2.2, -1.0], dtype=torch.float64)
    T, N = 0.9, 40000
    inputs = _inputs(x.expand(N, -1).contiguous(), T, seeds=20240607, offsets=torch.arange(N), **filters)
    counts = np.bincount(_run(inputs).numpy(), minlength=len(x))
    p = _expected_distribution(x.numpy(), T, **filters)
    assert counts[p == 0].sum() == 0, "drew tokens the filters remove"
    s = p > 0
    chi2 = float(((counts[s] - N * p[s]) ** 2 / (N * p[s])).sum())
    df = int(s.sum()) - 1
    if df > 0:
        assert chi2 < _chi2_upper(df), f"chi2 {chi2:.1f} for df {df}"
    # the test can fail: the same draws against the unfiltered softmax (a filter ignored)
    wrong = _expected_distribution(x.numpy(), T, 0, 1.0, 0.0)
    if not np.allclose(wrong, p):
        bad = float(((counts - N * wrong) ** 2 / (N * wrong)).sum())
        assert bad > _chi2_upper(len(x) - 1), "the distribution test cannot tell the filters apart"


def test_determinism_and_dependence_on_seed_and_offset():
    gen = torch.Generator().manual_seed(5)
    inputs = SPEC.make_inputs(dict(B=64, V=5000, dtype=torch.float32, mode="plain"), gen, "cpu")
    a, b = _run(inputs), _run(inputs)
    assert torch.equal(a, b)
    other_seed = _run({**inputs, "seeds": inputs["seeds"] + 1})
    other_step = _run({**inputs, "offsets": inputs["offsets"] + 1})
    assert (other_seed != a).float().mean() > 0.5 and (other_step != a).float().mean() > 0.5
    # rows are independent of their batch neighbours
    assert torch.equal(_run({k: v[10:20] for k, v in inputs.items()}), a[10:20])


# -- compare: accepts rounding, rejects wrong behaviour ----------------------------------------
def _bound(case, seed):
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(seed), "cpu")
    call = SPEC.bind(inputs)
    ref = torch.empty(call.dims["B"], dtype=torch.int64)
    SPEC.reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}, out=ref)
    return inputs, call, ref


CASES = [dict(B=64, V=600, dtype=torch.float32, mode="filters"),
         dict(B=64, V=600, dtype=torch.bfloat16, mode="mixed")]


@pytest.mark.parametrize("case", CASES, ids=SPEC.label)
def test_compare_accepts_float32_and_rejects_wrong_samplers(case):
    inputs, call, ref = _bound(case, 1)
    assert SPEC.compare("out", ref.clone(), ref, call) is None
    assert SPEC.compare("out", _run(inputs), ref, call) is None  # float32 arithmetic: within rounding
    sampled = inputs["temperature"] > 0

    def no_filters():
        return _run({**inputs, "top_k": torch.zeros_like(inputs["top_k"]),
                     "top_p": torch.ones_like(inputs["top_p"]), "min_p": torch.zeros_like(inputs["min_p"])})

    def other_randomness():
        return _run({**inputs, "seeds": inputs["seeds"] ^ 0x5A5A})

    def multinomial():
        x = inputs["logits"].double()
        _, _, keep = sample_op._filters(x, inputs["temperature"].double(), inputs["top_k"],
                                        inputs["top_p"].double(), inputs["min_p"].double())
        z = (x - x.max(1, keepdim=True).values) / inputs["temperature"].double().clamp(min=1e-3)[:, None]
        w = torch.exp(z) * keep
        tok = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(0))[:, 0]
        return torch.where(sampled, tok, ref)

    for wrong in (no_filters, other_randomness, multinomial):
        msg = SPEC.compare("out", wrong(), ref, call)
        assert msg is not None and "rows pick a token" in msg, wrong.__name__
    # greedy rows are exact: the last maximum instead of the first fails
    if not bool(sampled.all()):
        x = inputs["logits"].float()
        last_max = (x.shape[1] - 1) - x.flip(1).argmax(1)
        tied = (last_max != ref) & ~sampled
        if bool(tied.any()):
            out = ref.clone()
            out[tied] = last_max[tied]
            assert SPEC.compare("out", out, ref, call) is not None
    # an unwritten (poisoned) row fails
    out = ref.clone()
    out[3] = -0x5EED
    assert SPEC.compare("out", out, ref, call) is not None


def test_compare_accepts_a_near_tie_in_the_race():
    """Two tokens whose race scores differ by less than rounding: either answer is right."""
    V = 8
    x = torch.zeros(1, V, dtype=torch.float64)
    inputs = _inputs(x, 1.0, seeds=7, offsets=3)
    g = -torch.log(sample_op.exponentials(sample_op.random_bits(inputs["seeds"], inputs["offsets"], V)))[0]
    first, second = g.topk(2).indices.tolist()
    x[0, second] += float(g[first] - g[second]) + 1e-9  # now second wins by 1e-9
    inputs = _inputs(x.float().double(), 1.0, seeds=7, offsets=3)
    call = SPEC.bind({**inputs, "logits": x.float()})
    ref = _run(inputs)
    assert SPEC.compare("out", torch.tensor([first]), ref, call) is None
    assert SPEC.compare("out", torch.tensor([second]), ref, call) is None
    third = g.topk(3).indices[2].item()
    assert SPEC.compare("out", torch.tensor([third]), ref, call) is not None


# -- validation ---------------------------------------------------------------------------------
def _valid():
    return SPEC.make_inputs(dict(B=3, V=50, dtype=torch.float32), torch.Generator().manual_seed(0), "cpu")


ROLES = [r.name for r in SPEC.inputs]


@pytest.mark.parametrize("name", ROLES + ["out"])
def test_bad_inputs_name_the_argument(name):
    args = {**_valid(), "out": torch.empty(3, dtype=torch.int64)}
    t = args[name]
    wrong_dtype = torch.float64 if t.dtype != torch.float64 else torch.int32
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)[..., ::2]
    variants = {
        "dtype": t.to(wrong_dtype),
        "rank": t.unsqueeze(-1),
        "non-contiguous": wide,
        "device": t.to("meta"),
    }
    if name != "logits":  # logits binds B and V first; a later disagreement names the later argument
        variants["shape"] = t[:-1]
    for what, bad in variants.items():
        with pytest.raises(ArgumentError) as exc:
            sample_op.sample(**{**args, name: bad})
        if what == "device" and name == "logits":
            # the first input sets the call's device: the next argument is the one reported
            assert "'logits'" in str(exc.value), str(exc.value)
        else:
            assert exc.value.arg == name, f"{what}: {exc.value}"


def test_bad_values_and_missing_arguments():
    args = _valid()
    with pytest.raises(ArgumentError, match="'logits'"):
        sample_op.sample(**{**args, "logits": torch.empty(3, 0)})
    for name in ROLES:
        with pytest.raises(ArgumentError, match=f"'{name}'"):
            sample_op.sample(**{k: v for k, v in args.items() if k != name} | {name: None})


def test_public_function_and_presets():
    args = _valid()
    out = sample_op.sample(**args)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert torch.equal(out, _run(args))
    assert {"small", "large"} <= set(SPEC.presets)
    assert all(c["B"] == 256 and c["V"] == 129280 for c in SPEC.presets["large"][:3])
    assert SPEC.grid("small") and all(c["V"] <= 4096 for c in SPEC.grid("small"))
