"""``rope``: rotary position embedding of queries and keys from a cos/sin cache.

Each vector of width Dr is split into Dr/2 pairs; pair i of a token at position p is rotated by
the angle whose cosine and sine are ``cos_sin_cache[p, i]`` and ``cos_sin_cache[p, Dr/2 + i]``:

    (a, b) -> (a * cos - b * sin,  b * cos + a * sin)

``style`` says which elements form pair i: ``"neox"`` rotates halves, (x[i], x[i + Dr/2]);
``"gptj"`` rotates interleaved neighbours, (x[2i], x[2i + 1]) (DeepSeek's 64-dim rope part).
Computed in float32 (float64 for float64 inputs), cast to the output dtype once.

The cache carries everything else: ``rope_cos_sin_cache`` builds the plain one (angle
p * base^(-2i/Dr)), ``yarn_cos_sin_cache`` DeepSeek's YaRN one (interpolated frequencies, cos and
sin scaled by the attention-temperature factor mscale). In place: pass ``q_out=q, k_out=k`` (each
element is read before it is written, by the same program).
Contract: 0 <= positions[t] < max_pos (not checked: it would need a host sync).
DeepSeek-V3 shapes: Dr = 64, Hq = 128 (16 per GPU at TP 8), Hk = 1 (the shared k_pe), gptj.
"""

from __future__ import annotations

import math

import torch

from .._errors import ArgumentError
from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole, dtype_name
from ._common import ELEMENTWISE_TOL, FLOATS, nbytes, randint, randn

DTYPES = FLOATS
STYLES = ("neox", "gptj")


# -- cos/sin caches ----------------------------------------------------------------------------
def rope_cos_sin_cache(base: float, dim: int, max_pos: int, *, dtype=torch.float32,
                       device=None) -> torch.Tensor:
    """The plain RoPE cache [max_pos, dim]: cos of the angles, then their sin (computed in float64)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return _cache_from_inv_freq(inv_freq, max_pos, 1.0, dtype, device)


def yarn_get_mscale(scaling_factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(s) + 1 (1 when not extending)."""
    return 1.0 if scaling_factor <= 1.0 else 0.1 * mscale * math.log(scaling_factor) + 1.0


def yarn_cos_sin_cache(base: float, dim: int, scaling_factor: float, original_max_position: int, *,
                       beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float = 1.0,
                       mscale_all_dim: float = 1.0, max_pos: int | None = None,
                       dtype=torch.float32, device=None) -> torch.Tensor:
    """DeepSeek YaRN cache [max_pos, dim] (default max_pos = original_max_position * scaling_factor).

    Frequencies that turn more than ``beta_fast`` times over the original context keep their
    value (extrapolation), those that turn fewer than ``beta_slow`` times are divided by
    ``scaling_factor`` (interpolation), with a linear ramp over the pair index in between. cos
    and sin are multiplied by yarn_get_mscale(s, mscale) / yarn_get_mscale(s, mscale_all_dim)
    (1 for DeepSeek-V3, whose softmax scale carries the factor instead).
    DeepSeek-V3: base 10000, dim 64, s 40, original 4096, beta 32/1, mscale 1, mscale_all_dim 1.
    """
    if max_pos is None:
        max_pos = int(original_max_position * scaling_factor)
    half = dim // 2
    inv_freq_extra = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq_inter = inv_freq_extra / scaling_factor

    def pair_index_for_rotations(rotations: float) -> float:
        # pair index whose wavelength fits `rotations` times into the original context
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index_for_rotations(beta_fast)), 0)
    high = min(math.ceil(pair_index_for_rotations(beta_slow)), dim - 1)
    span = (high - low) if high != low else 0.001
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / span).clamp(0.0, 1.0)
    inv_freq = inv_freq_extra * (1.0 - ramp) + inv_freq_inter * ramp
    scale = yarn_get_mscale(scaling_factor, mscale) / yarn_get_mscale(scaling_factor, mscale_all_dim)
    return _cache_from_inv_freq(inv_freq, max_pos, scale, dtype, device)


def _cache_from_inv_freq(inv_freq, max_pos, scale, dtype, device) -> torch.Tensor:
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat([angles.cos() * scale, angles.sin() * scale], dim=-1)
    return cache.to(dtype).to(device if device is not None else "cpu")


# -- the op ------------------------------------------------------------------------------------
def _rotate(x, cos, sin, style: str):
    """x [T, H, Dr] in the accumulation dtype, cos/sin [T, 1, Dr/2]."""
    if style == "neox":
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def reference(q, k, positions, cos_sin_cache, q_out, k_out, style="neox"):
    """The meaning of rope; computes in float32, or float64 for float64 inputs."""
    acc = torch.promote_types(q.dtype, torch.float32)
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()].to(acc)[:, None, :]  # [T, 1, Dr]
    cos, sin = rows[..., :half], rows[..., half:]
    q_rot = _rotate(q.to(acc), cos, sin, style)
    k_rot = _rotate(k.to(acc), cos, sin, style)
    q_out.copy_(q_rot.to(q_out.dtype))
    k_out.copy_(k_rot.to(k_out.dtype))


def _check_values(call: BoundCall) -> None:
    dr = call.dims["Dr"]
    if dr % 2:
        raise ArgumentError("rope", "q", f"rotary width Dr (dim 2) must be even, got {dr}")


def make_inputs(case, gen, device):
    T, Hq, Hk, Dr = case["T"], case["Hq"], case.get("Hk", 1), case["Dr"]
    dtype = case["dtype"]
    max_pos = case.get("max_pos", 4096)
    if case.get("yarn", False):
        # DeepSeek-V3's YaRN, truncated to max_pos rows; mscale_all_dim 0 exercises the cos/sin factor
        cache = yarn_cos_sin_cache(10000.0, Dr, 40.0, 4096, mscale=1.0, mscale_all_dim=0.0, max_pos=max_pos)
    else:
        cache = rope_cos_sin_cache(case.get("base", 10000.0), Dr, max_pos)
    positions = randint(0, max_pos, (T,), gen, "cpu", dtype=torch.int64)
    if T:
        positions[0] = max_pos - 1  # the last cache row, and the first
        positions[-1] = 0 if T > 1 else positions[-1]
    return {
        "q": randn((T, Hq, Dr), dtype, gen, device),
        "k": randn((T, Hk, Dr), dtype, gen, device),
        "positions": positions.to(device),
        "cos_sin_cache": cache.to(case.get("cache_dtype", torch.float32)).to(device),
        "style": case.get("style", "neox"),
    }


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    T, _, Dr = t["q"].shape
    elems = t["q"].numel() + t["k"].numel()
    rows_read = T * Dr * t["cos_sin_cache"].element_size()  # one cache row per token
    return Cost(3.0 * elems, nbytes(t["q"], t["k"], t["q_out"], t["k_out"], t["positions"]) + rows_read)


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        # awkward: one token, Dr=2 (one pair), Dr/2 odd, heads not a power of two
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for style in STYLES:
                cases += [
                    dict(T=1, Hq=1, Hk=1, Dr=2, style=style, dtype=dtype),
                    dict(T=5, Hq=3, Hk=1, Dr=6, style=style, dtype=dtype),
                    dict(T=7, Hq=16, Hk=1, Dr=64, style=style, dtype=dtype, yarn=True),
                ]
        cases += [dict(T=3, Hq=8, Hk=2, Dr=128, style="neox", dtype=torch.bfloat16,
                       cache_dtype=torch.bfloat16),
                  dict(T=0, Hq=4, Hk=1, Dr=64, style="gptj", dtype=torch.bfloat16)]
    else:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for style in STYLES:
                cases += [dict(T=1, Hq=128, Hk=1, Dr=64, style=style, dtype=dtype, yarn=True),
                          dict(T=777, Hq=16, Hk=1, Dr=64, style=style, dtype=dtype, yarn=True),
                          dict(T=4096, Hq=128, Hk=1, Dr=64, style=style, dtype=dtype, yarn=True,
                               max_pos=163840),
                          dict(T=513, Hq=32, Hk=8, Dr=128, style=style, dtype=dtype),
                          dict(T=100, Hq=5, Hk=3, Dr=6, style=style, dtype=dtype)]
    return cases


def _label(case) -> str:
    extra = " yarn" if case.get("yarn") else ""
    cd = case.get("cache_dtype")
    extra += f" cache={dtype_name(cd)}" if cd else ""
    return (f"T={case['T']} Hq={case['Hq']} Hk={case.get('Hk', 1)} Dr={case['Dr']} "
            f"{case.get('style', 'neox')} {dtype_name(case['dtype'])}{extra}")


SPEC = OpSpec(
    name="rope",
    doc=__doc__,
    inputs=(
        TensorRole("q", ("T", "Hq", "Dr"), DTYPES, "queries (the rotary part)"),
        TensorRole("k", ("T", "Hk", "Dr"), DTYPES, "keys (the rotary part)", same_dtype_as="q"),
        TensorRole("positions", ("T",), (torch.int64,), "position of each token"),
        TensorRole("cos_sin_cache", ("MP", "Dr"), DTYPES, "cos of each pair's angle, then sin"),
    ),
    outputs=(
        TensorRole("q_out", ("T", "Hq", "Dr"), DTYPES, "rotated queries (may be q)", same_dtype_as="q"),
        TensorRole("k_out", ("T", "Hk", "Dr"), DTYPES, "rotated keys (may be k)", same_dtype_as="q"),
    ),
    params=(ScalarParam("style", str, "which elements pair up: neox (halves) or gptj (neighbours)",
                        default="neox", choices=STYLES, static=True),),
    reference=reference,
    primary="q",
    tolerances=ELEMENTWISE_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("Hq", "Hk", "Dr"),
    check_values=_check_values,
    case_label=_label,
    presets={
        "small": [dict(T=64, Hq=16, Hk=1, Dr=64, style="gptj", dtype=torch.float32, yarn=True)],
        "large": [dict(T=16384, Hq=128, Hk=1, Dr=64, style=s, dtype=torch.bfloat16, yarn=True,
                       max_pos=163840) for s in ("gptj", "neox")],
    },
)


def rope(q, k, positions, cos_sin_cache, *, style="neox", q_out=None, k_out=None):
    """Run the selected rope kernel. Returns (q_out, k_out); pass q_out=q, k_out=k for in place."""
    from .. import get_registry

    return get_registry().call("rope", q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache,
                               style=style, q_out=q_out, k_out=k_out)
