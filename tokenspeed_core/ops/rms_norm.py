"""``rms_norm``: root-mean-square normalisation of each row, with an optional fused residual add.

For each row t of x (and of ``residual`` when given):

    s               = x[t] + residual[t]   rounded once to x's dtype   (s = x[t] without a residual)
    residual_out[t] = s                    (the new residual stream; only with a residual)
    out[t]          = s / sqrt(mean(s * s) + eps) * weight

Computed in float32 (float64 for float64 inputs): the weight multiplies the normalised value, and
the result is cast to the output dtype once. The norm is taken of the rounded sum, i.e. of exactly
what ``residual_out`` holds and the next layer adds to. ``residual_out`` exists only when
``residual`` is given (``present_if``): the norms that need no residual (DeepSeek's q_a/kv_a norms,
the first decoder layer, whose residual is x itself) write nothing but ``out``.

Aliasing: ``residual_out`` may be ``residual`` and ``out`` may be ``x`` (each element is read before
it is written, by the same program), which gives the in-place update of the residual stream.
DeepSeek-V3 shapes: N = 7168 (hidden), 1536 (q_a), 512 (kv_a); eps = 1e-6.
"""

from __future__ import annotations

import torch

from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole, dtype_name
from ._common import ELEMENTWISE_TOL, FLOATS, nbytes, randn

DTYPES = FLOATS


def reference(x, weight, out, residual_out=None, residual=None, eps=1e-6):
    """The meaning of rms_norm; computes in float32, or float64 for float64 inputs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    s = x.to(acc, copy=True)  # a copy: out may alias x
    if residual is not None:
        s = s + residual.to(acc)
        s = s.to(x.dtype).to(acc)
    inv_rms = torch.rsqrt(s.square().mean(dim=-1, keepdim=True) + eps)
    out.copy_((s * inv_rms * weight.to(acc)).to(out.dtype))
    if residual_out is not None:
        residual_out.copy_(s.to(residual_out.dtype))


def _check_eps(v: float) -> str | None:
    return None if v > 0 else f"expected > 0, got {v}"


def make_inputs(case, gen, device):
    T, N, dtype = case["T"], case["N"], case["dtype"]
    inputs = {
        # an offset keeps the mean square well away from eps, and makes a kernel that forgets to
        # add the residual (or adds it twice) visibly wrong
        "x": randn((T, N), dtype, gen, device, scale=case.get("scale", 1.0)),
        "weight": (1.0 + randn((N,), dtype, gen, device, scale=0.25).float()).to(dtype),
        "eps": case.get("eps", 1e-6),
    }
    if case.get("residual", False):
        inputs["residual"] = randn((T, N), dtype, gen, device, scale=2.0)
    return inputs


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    T, N = t["x"].shape
    fused = t["residual"] is not None
    flops = T * N * (4.0 + (1.0 if fused else 0.0))  # square, sum, scale, weight (+ residual add)
    return Cost(flops, nbytes(t["x"], t["weight"], t["residual"], t["out"], t.get("residual_out")))


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        # awkward: one row, one column, odd widths, a width just past a power of two
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [
                dict(T=1, N=1, dtype=dtype),
                dict(T=3, N=7, dtype=dtype, residual=True),
                dict(T=5, N=130, dtype=dtype),
                dict(T=2, N=4097, dtype=dtype, residual=True),
            ]
        cases += [dict(T=9, N=512, dtype=torch.bfloat16, residual=True, scale=30.0),
                  dict(T=2, N=16385, dtype=torch.bfloat16, residual=True),  # wider than a register tile
                  dict(T=0, N=64, dtype=torch.float16, residual=True)]
    else:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for N in (512, 1536, 4097, 7168, 16384):
                for residual in (False, True):
                    cases.append(dict(T=777, N=N, dtype=dtype, residual=residual))
            cases += [dict(T=1, N=7168, dtype=dtype, residual=True),
                      dict(T=4096, N=7168, dtype=dtype, residual=True),
                      dict(T=8, N=65536 + 3, dtype=dtype, residual=True)]
    return cases


def _label(case) -> str:
    return (f"T={case['T']} N={case['N']} {dtype_name(case['dtype'])}"
            + (" +residual" if case.get("residual") else ""))


SPEC = OpSpec(
    name="rms_norm",
    doc=__doc__,
    inputs=(
        TensorRole("x", ("T", "N"), DTYPES, "rows to normalise"),
        TensorRole("weight", ("N",), DTYPES, "per-column gain", same_dtype_as="x"),
        TensorRole("residual", ("T", "N"), DTYPES, "residual stream added to x before the norm",
                   optional=True, same_dtype_as="x"),
    ),
    outputs=(
        TensorRole("out", ("T", "N"), DTYPES, "normalised rows", same_dtype_as="x"),
        TensorRole("residual_out", ("T", "N"), DTYPES, "x + residual (the new residual stream)",
                   same_dtype_as="x", present_if="residual"),
    ),
    params=(ScalarParam("eps", float, "added to the mean square", default=1e-6, check=_check_eps),),
    reference=reference,
    primary="x",
    tolerances=ELEMENTWISE_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("N",),
    case_label=_label,
    presets={
        "small": [dict(T=64, N=1024, dtype=torch.float32, residual=True)],
        "large": [dict(T=16384, N=7168, dtype=torch.bfloat16, residual=r) for r in (False, True)]
        + [dict(T=16384, N=n, dtype=torch.bfloat16) for n in (512, 1536)]
        + [dict(T=131072, N=512, dtype=torch.bfloat16)],  # MLA's kv_a norm over a 128K-token prefill
    },
)


def rms_norm(x, weight, residual=None, *, eps=1e-6, out=None, residual_out=None):
    """Run the selected rms_norm kernel. Returns (out, residual_out); residual_out is None
    without a residual."""
    from .. import get_registry

    return get_registry().call("rms_norm", x=x, weight=weight, residual=residual, eps=eps, out=out,
                               residual_out=residual_out)
