"""rms_norm, rope (+ cos/sin caches), silu_and_mul, kv_cache_write: each reference against an
independent float64 formulation, the public functions, and bad inputs naming the argument."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

import tokenspeed_core
from tokenspeed_core import ArgumentError
from tokenspeed_core.ops import kv_cache_write as kvw
from tokenspeed_core.ops import rms_norm as rn
from tokenspeed_core.ops import rope as rp
from tokenspeed_core.ops import silu_and_mul as sm

CPU = torch.device("cpu")
SPECS = {"rms_norm": rn.SPEC, "rope": rp.SPEC, "silu_and_mul": sm.SPEC, "kv_cache_write": kvw.SPEC}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run_reference(spec, case, seed=0):
    """Bind generated inputs (outputs allocated and NaN-poisoned), run the reference, return the call."""
    call = spec.bind(spec.make_inputs(case, _gen(seed), CPU))
    for r in spec.outputs:
        if not r.inout and call.tensors[r.name] is not None:  # in-out contents are part of the meaning
            call.tensors[r.name].fill_(float("nan"))
    spec.reference(**call.kwargs())
    return call


def _close(out, expected, dtype):
    atol, rtol = rn.ELEMENTWISE_TOL[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


# -- rms_norm --------------------------------------------------------------------------------
def _rms_norm_f64(x, weight, residual, eps):
    """Row by row in float64, the sum rounded to x's dtype as the spec states."""
    s = x.double() if residual is None else (x.double() + residual.double()).to(x.dtype).double()
    out = torch.empty_like(s)
    for t in range(s.shape[0]):
        row = s[t]
        rms = math.sqrt(sum(v * v for v in row.tolist()) / row.numel() + eps)
        out[t] = row / rms * weight.double()
    return out, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("T,N", [(1, 1), (3, 7), (4, 257)])
def test_rms_norm_reference(dtype, residual, T, N):
    call = _run_reference(rn.SPEC, dict(T=T, N=N, dtype=dtype, residual=residual), seed=T * N)
    t = call.tensors
    out, s = _rms_norm_f64(t["x"], t["weight"], t["residual"], call.params["eps"])
    _close(t["out"], out, dtype)
    if residual:
        _close(t["residual_out"], s, dtype)
    else:
        assert t["residual_out"] is None  # exists only with a residual (present_if)


def test_rms_norm_in_place_aliases():
    x = torch.randn(5, 33, generator=_gen(1))
    res = torch.randn(5, 33, generator=_gen(2))
    w = torch.rand(33, generator=_gen(3)) + 0.5
    expected_out, expected_sum = _rms_norm_f64(x, w, res, 1e-6)
    out, new_res = rn.rms_norm(x, w, res, out=x, residual_out=res)  # fully in place
    assert out is x and new_res is res
    _close(x, expected_out, torch.float32)
    _close(res, expected_sum, torch.float32)


# -- rope ------------------------------------------------------------------------------------
def _inv_freq_plain(base, dim):
    return [base ** (-(2.0 * i) / dim) for i in range(dim // 2)]


def _inv_freq_yarn(base, dim, s, orig, beta_fast, beta_slow):
    """YaRN by wavelengths, scalar math: pair i keeps its frequency when it turns more than
    beta_fast times over the original context, is divided by s below beta_slow turns, ramps linearly
    (over the pair index, bounds rounded outwards) in between."""
    def boundary(turns):  # pair index whose wavelength 2*pi*base^(2i/dim) == orig / turns
        return dim / 2 * math.log(orig / (2 * math.pi * turns)) / math.log(base)

    lo = max(math.floor(boundary(beta_fast)), 0)
    hi = min(math.ceil(boundary(beta_slow)), dim - 1)
    freqs = []
    for i, f in enumerate(_inv_freq_plain(base, dim)):
        w = min(max((i - lo) / ((hi - lo) or 0.001), 0.0), 1.0)  # 0: keep, 1: interpolate
        freqs.append(f * (1 - w) + f / s * w)
    return freqs


def _rope_complex(x, positions, inv_freq, style, scale=1.0):
    """Rotation as complex multiplication, float64: pair (a, b) is a + ib times scale * e^(i p f)."""
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=torch.float64)
    half = D // 2
    xs = x.double().tolist()
    for t in range(T):
        p = int(positions[t])
        for h in range(H):
            for i in range(half):
                ia, ib = (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)
                z = complex(xs[t][h][ia], xs[t][h][ib]) * scale * cmath.exp(1j * p * inv_freq[i])
                out[t, h, ia], out[t, h, ib] = z.real, z.imag
    return out


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("yarn", [False, True])
def test_rope_reference_against_complex_rotation(style, dtype, yarn):
    D, max_pos = 16, 5000
    case = dict(T=6, Hq=3, Hk=2, Dr=D, style=style, dtype=dtype, yarn=yarn, max_pos=max_pos)
    call = _run_reference(rp.SPEC, case, seed=7)
    t = call.tensors
    if yarn:  # make_inputs' YaRN: DeepSeek-V3's parameters with mscale_all_dim 0
        inv_freq = _inv_freq_yarn(10000.0, D, 40.0, 4096, 32.0, 1.0)
        scale = 0.1 * math.log(40.0) + 1.0
    else:
        inv_freq, scale = _inv_freq_plain(10000.0, D), 1.0
    _close(t["q_out"], _rope_complex(t["q"], t["positions"], inv_freq, style, scale), dtype)
    _close(t["k_out"], _rope_complex(t["k"], t["positions"], inv_freq, style, scale), dtype)


def test_rope_caches_against_independent_formulas():
    # DeepSeek-V3: base 1e4, rope dim 64, factor 40 over 4096 positions, beta 32/1, both mscales 1
    cache = rp.yarn_cos_sin_cache(10000.0, 64, 40.0, 4096)
    assert cache.shape == (163840, 64) and cache.dtype == torch.float32
    f = _inv_freq_yarn(10000.0, 64, 40.0, 4096, 32.0, 1.0)
    for p in (0, 1, 4095, 77777, 163839):
        ang = torch.tensor([p * fi for fi in f], dtype=torch.float64)
        torch.testing.assert_close(cache[p].double(), torch.cat([ang.cos(), ang.sin()]), atol=1e-6, rtol=0)
    # extremes of the ramp: the fastest pair keeps its frequency, the slowest is divided by 40
    assert f[0] == 1.0 and f[-1] == pytest.approx(10000.0 ** (-62 / 64) / 40.0, rel=1e-12)
    plain = rp.rope_cos_sin_cache(500000.0, 128, 300)
    ang = torch.tensor([299 * fi for fi in _inv_freq_plain(500000.0, 128)], dtype=torch.float64)
    torch.testing.assert_close(plain[299].double(), torch.cat([ang.cos(), ang.sin()]), atol=1e-6, rtol=0)
    # the attention-temperature factor scales cos and sin alike
    scaled = rp.yarn_cos_sin_cache(10000.0, 64, 40.0, 4096, mscale=1.0, mscale_all_dim=0.0, max_pos=10)
    torch.testing.assert_close(scaled, cache[:10] * (0.1 * math.log(40.0) + 1.0))
    assert rp.yarn_get_mscale(1.0) == 1.0


def test_rope_in_place():
    call = rp.SPEC.bind(rp.SPEC.make_inputs(dict(T=4, Hq=2, Hk=1, Dr=8, dtype=torch.float32), _gen(3), CPU))
    t = call.tensors
    q, k = t["q"].clone(), t["k"].clone()
    expected = _rope_complex(q, t["positions"], _inv_freq_plain(10000.0, 8), "neox")
    q_out, k_out = rp.rope(q, k, t["positions"], t["cos_sin_cache"], q_out=q, k_out=k)
    assert q_out is q and k_out is k
    _close(q, expected, torch.float32)


# -- silu_and_mul ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_and_mul_reference(dtype):
    call = _run_reference(sm.SPEC, dict(T=3, N=37, dtype=dtype))
    x = call.tensors["x"].double()
    g, u = x[:, 0], x[:, 1]
    expected = torch.tensor([[a / (1 + math.exp(-a)) * b for a, b in zip(gr, ur, strict=True)]
                             for gr, ur in zip(g.tolist(), u.tolist(), strict=True)], dtype=torch.float64)
    _close(call.tensors["out"], expected, dtype)


def test_silu_and_mul_public_takes_gemm_layout():
    x = torch.randn(4, 2 * 9, generator=_gen(5))
    out = sm.silu_and_mul(x)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :9]) * x[:, 9:])
    with pytest.raises(ArgumentError, match="'x'"):
        sm.silu_and_mul(torch.randn(4, 7))
    with pytest.raises(ArgumentError, match="'x'"):
        sm.silu_and_mul(torch.randn(4, 36)[:, ::2])


# -- kv_cache_write --------------------------------------------------------------------------
def _kv_write_loop(kv, slots, cache, scale):
    """Row by row: slot -> (page, offset); float64 quotient, rounded as the cache dtype rounds."""
    out = cache.clone()
    ps = cache.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        row = kv[t].double() / scale
        if cache.dtype == torch.float8_e4m3fn:
            row = row.clamp(-448, 448)
        out[s // ps, s % ps] = row.to(cache.dtype)
    return out


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float8_e4m3fn)])
def test_kv_cache_write_reference(dtype, cache_dtype):
    case = dict(T=11, D=20, page_size=4, pages=5, dtype=dtype, cache_dtype=cache_dtype, padding=3)
    args = kvw.SPEC.make_inputs(case, _gen(11), CPU)
    before = args["kv_cache"].clone()
    expected = _kv_write_loop(args["kv"], args["slot_mapping"], before, args["kv_scale"])
    kvw.SPEC.reference(**args)
    assert (args["slot_mapping"] == -1).sum() == 3
    if cache_dtype == torch.float8_e4m3fn:  # the out-of-range value saturates, never NaN
        assert not args["kv_cache"].float().isnan().any()
        assert args["kv_cache"].float().abs().max() == 448
    got, exp = args["kv_cache"].float(), expected.float()
    assert torch.equal(got, exp) or kvw.compare("kv_cache", args["kv_cache"], expected.double(),
                                                kvw.SPEC.bind(args)) is None


def test_kv_cache_write_compare_catches_clobbered_and_wrong_rows():
    case = dict(T=6, D=8, page_size=4, pages=3, dtype=torch.float32, padding=1)
    args = kvw.SPEC.make_inputs(case, _gen(4), CPU)
    call = kvw.SPEC.bind(args)
    ref = args["kv_cache"].double().clone()
    kvw.SPEC.reference(kv=args["kv"].double(), slot_mapping=args["slot_mapping"], kv_cache=ref)
    good = ref.float()
    assert kvw.compare("kv_cache", good, ref, call) is None
    untouched = sorted(set(range(12)) - set(args["slot_mapping"].tolist()))
    clobbered = good.clone()
    clobbered.view(-1, 8)[untouched[0]] = 0.0
    assert "not addressed" in kvw.compare("kv_cache", clobbered, ref, call)
    wrong = good.clone()
    s = int(args["slot_mapping"][args["slot_mapping"] >= 0][0])
    wrong.view(-1, 8)[s, 3] += 1.0
    assert "written element" in kvw.compare("kv_cache", wrong, ref, call)
    unwritten = good.clone()
    unwritten.view(-1, 8)[s] = float("nan")
    assert "written element" in kvw.compare("kv_cache", unwritten, ref, call)


def test_kv_cache_write_public_is_in_place():
    cache = torch.randn(2, 4, 3)
    kv = torch.randn(2, 3)
    before = cache.clone()
    got = kvw.kv_cache_write(kv, torch.tensor([5, -1]), cache)
    assert got is cache
    before[1, 1] = kv[0]
    assert torch.equal(cache, before)
    with pytest.raises(ArgumentError, match="'kv_cache'"):
        kvw.kv_cache_write(kv, torch.tensor([5, -1]), None)


# -- grids, presets, costs -------------------------------------------------------------------
@pytest.mark.parametrize("op", SPECS)
def test_grids_presets_and_costs(op):
    spec = SPECS[op]
    small = spec.grid("small")
    assert spec.grid("full") and small and "large" in spec.presets and "small" in spec.presets
    dtypes = {c["dtype"] for c in small}
    assert dtypes == {torch.float32, torch.bfloat16, torch.float16}
    for case in small + spec.presets["small"]:
        call = spec.bind(spec.make_inputs(case, _gen(), CPU))
        c = spec.cost(call)
        assert c.bytes >= 0 and c.flops >= 0 and spec.label(case)
        for name, t in call.tensors.items():  # never zeros
            if t is not None and t.numel() > 1 and t.is_floating_point() and name in {r.name for r in spec.inputs}:
                assert t.float().abs().sum() > 0, name


# -- bad inputs ------------------------------------------------------------------------------
def _valid_args(op):
    spec = SPECS[op]
    case = {"rms_norm": dict(T=3, N=8, dtype=torch.bfloat16, residual=True),
            "rope": dict(T=3, Hq=2, Hk=1, Dr=8, dtype=torch.bfloat16),
            "silu_and_mul": dict(T=3, N=8, dtype=torch.bfloat16),
            "kv_cache_write": dict(T=3, D=8, page_size=4, pages=2, dtype=torch.bfloat16)}[op]
    return spec.make_inputs(case, _gen(), CPU)


def _tensor_args(op):
    spec = SPECS[op]
    args = _valid_args(op)
    return [r.name for r in spec.roles if isinstance(args.get(r.name), torch.Tensor)]


def _call(op, args):
    return tokenspeed_core.build_registry(entry_points=False).call(op, **args)


@pytest.mark.parametrize("op", SPECS)
def test_bad_inputs_name_the_argument(op):
    args = _valid_args(op)
    _call(op, dict(args))  # the valid call runs
    first_tensor = SPECS[op].inputs[0].name
    for name in _tensor_args(op):
        t = args[name]
        wrong = torch.float64 if t.is_floating_point() else torch.int32
        variants = {
            "dtype": t.to(wrong),
            "shape": t.unsqueeze(0),
            "non-contiguous": torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)[..., ::2]
            if t.shape[-1] > 1 else None,
        }
        if name != first_tensor:  # the first tensor sets the device; the others must follow it
            variants["device"] = t.to("meta")
        for what, bad in variants.items():
            if bad is None:
                continue
            with pytest.raises(ArgumentError) as exc:
                _call(op, {**args, name: bad})
            assert exc.value.arg == name, (op, what, str(exc.value))


@pytest.mark.parametrize("op,bad,arg", [
    ("rms_norm", dict(eps=0.0), "eps"),
    ("rope", dict(style="llama"), "style"),
    ("kv_cache_write", dict(kv_scale=-1.0), "kv_scale"),
])
def test_bad_params_name_the_argument(op, bad, arg):
    with pytest.raises(ArgumentError) as exc:
        _call(op, {**_valid_args(op), **bad})
    assert exc.value.arg == arg


def test_value_checks():
    args = _valid_args("rope")
    odd = {**args, "q": args["q"][..., :7].contiguous(), "k": args["k"][..., :7].contiguous(),
           "cos_sin_cache": args["cos_sin_cache"][:, :7].contiguous()}
    with pytest.raises(ArgumentError, match="even"):
        _call("rope", odd)
    kv_args = _valid_args("kv_cache_write")
    with pytest.raises(ArgumentError) as exc:  # cache must match kv or be fp8
        _call("kv_cache_write", {**kv_args, "kv_cache": kv_args["kv_cache"].half()})
    assert exc.value.arg == "kv_cache"
    with pytest.raises(ArgumentError) as exc:  # silu_and_mul's spec layout is [T, 2, N]
        _call("silu_and_mul", {"x": torch.randn(3, 3, 4)})
    assert exc.value.arg == "x"


def test_rms_norm_residual_out_only_with_residual():
    x, w = torch.randn(2, 8), torch.rand(8) + 0.5
    with pytest.raises(ArgumentError, match="'residual_out': only exists when 'residual' is given"):
        rn.rms_norm(x, w, residual_out=torch.empty(2, 8))
    out, res = rn.rms_norm(x, w)
    assert res is None and out.shape == (2, 8)
