"""``silu_and_mul``: the gated activation of a SwiGLU MLP.

The gate and up projections come out of one GEMM as a row [gate | up] of width 2N; the spec names
that row's two halves as a dimension of size 2, x [T, 2, N] (a free view of the GEMM's [T, 2N]
output; the public function accepts either):

    out[t] = silu(x[t, 0]) * x[t, 1]        silu(g) = g / (1 + exp(-g))

Computed in float32 (float64 for float64 inputs), cast to the output dtype once.
DeepSeek-V3 shapes: N = 18432 (dense MLP), 2048 (one routed expert), divided by the TP degree.
"""

from __future__ import annotations

import torch

from .._errors import ArgumentError
from .._spec import BoundCall, Cost, OpSpec, TensorRole, dtype_name
from ._common import ELEMENTWISE_TOL, FLOATS, nbytes, randn

DTYPES = FLOATS


def reference(x, out):
    """The meaning of silu_and_mul; computes in float32, or float64 for float64 inputs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    gate, up = x[:, 0].to(acc), x[:, 1].to(acc)
    out.copy_((torch.nn.functional.silu(gate) * up).to(out.dtype))


def make_inputs(case, gen, device):
    T, N = case["T"], case["N"]
    # gates spread over the whole sigmoid (|g| up to ~12): both tails and the middle are exercised
    return {"x": randn((T, 2, N), case["dtype"], gen, device, scale=case.get("scale", 3.0))}


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    T, _, N = t["x"].shape
    return Cost(5.0 * T * N, nbytes(t["x"], t["out"]))  # neg, exp, add, div, mul


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [dict(T=1, N=1, dtype=dtype), dict(T=3, N=7, dtype=dtype),
                      dict(T=2, N=4097, dtype=dtype), dict(T=17, N=256, dtype=dtype)]
        cases += [dict(T=0, N=64, dtype=torch.bfloat16)]
    else:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for N in (256, 2048, 2304, 4097, 18432):
                cases += [dict(T=1, N=N, dtype=dtype), dict(T=777, N=N, dtype=dtype)]
            cases.append(dict(T=4096, N=18432, dtype=dtype))
    return cases


def _label(case) -> str:
    return f"T={case['T']} N={case['N']} {dtype_name(case['dtype'])}"


SPEC = OpSpec(
    name="silu_and_mul",
    doc=__doc__,
    inputs=(TensorRole("x", ("T", 2, "N"), DTYPES, "gate (x[:, 0]) and up (x[:, 1]) projections"),),
    outputs=(TensorRole("out", ("T", "N"), DTYPES, "silu(gate) * up", same_dtype_as="x"),),
    params=(),
    reference=reference,
    primary="x",
    tolerances=ELEMENTWISE_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("N",),
    case_label=_label,
    presets={
        "small": [dict(T=64, N=1024, dtype=torch.float32)],
        "large": [dict(T=16384, N=18432, dtype=torch.bfloat16), dict(T=16384, N=2048, dtype=torch.bfloat16)],
    },
)


def silu_and_mul(x, *, out=None):
    """Run the selected silu_and_mul kernel on x [T, 2N] (or [T, 2, N]). Returns out [T, N]."""
    from .. import get_registry

    if isinstance(x, torch.Tensor) and x.dim() == 2:
        if x.shape[1] % 2:
            raise ArgumentError("silu_and_mul", "x", f"last dim must be even (2N), got shape {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ArgumentError("silu_and_mul", "x", f"expected a contiguous tensor, got strides {x.stride()}")
        x = x.view(x.shape[0], 2, x.shape[1] // 2)
    return get_registry().call("silu_and_mul", x=x, out=out)
