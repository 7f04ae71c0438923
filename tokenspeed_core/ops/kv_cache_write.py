"""``kv_cache_write``: scatter new latent rows into the paged KV cache.

Row t of ``kv`` goes to cache slot ``slot_mapping[t]``, i.e. page ``slot // page_size``, offset
``slot % page_size``; a slot of -1 means "skip this row" (batch padding, as vLLM does):

    kv_cache[slot // PS, slot % PS] = kv[t] / kv_scale            (slot >= 0)

With an fp8 e4m3 cache the quotient is computed in float32, clamped to the e4m3 range (+-448) and
rounded to nearest even once; otherwise it is rounded to the cache dtype once (kv_scale is 1 there
in practice). Every cache row not addressed keeps its contents.

``kv_cache`` is an in-out role (``inout=True``): the caller always passes it, and its prior
contents are part of the meaning. ``compare`` checks written rows against the reference and that
every other row is bit-identical to what it held before, so a kernel that clobbers a slot it was
not given (even with NaN) fails.
Contract: slots are -1 or in [0, P * PS) and distinct (not checked: it would need a host sync).
DeepSeek-V3 shapes: D = 576 (512 latent + 64 rope), page_size 64, bf16 or fp8 e4m3.
"""

from __future__ import annotations

import torch

from .._errors import ArgumentError
from .._spec import BoundCall, Cost, OpSpec, ScalarParam, TensorRole, dtype_name
from ._common import ELEMENTWISE_TOL, FLOATS, nbytes, randn

KV_DTYPES = FLOATS
CACHE_DTYPES = FLOATS + (torch.float8_e4m3fn,)
FP8_MAX = 448.0


def reference(kv, slot_mapping, kv_cache, kv_scale=1.0):
    """The meaning of kv_cache_write; computes in float32, or float64 for float64 inputs."""
    acc = torch.promote_types(kv.dtype, torch.float32)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows = kv[keep].to(acc) / kv_scale
    if kv_cache.dtype == torch.float8_e4m3fn:
        rows = rows.clamp(-FP8_MAX, FP8_MAX)
    flat = kv_cache.view(-1, kv_cache.shape[-1])  # [P * PS, D]; the cache is contiguous
    flat[slots] = rows.to(kv_cache.dtype)


def _check_values(call: BoundCall) -> None:
    cache, kv = call.tensors["kv_cache"], call.tensors["kv"]
    if cache.dtype != torch.float8_e4m3fn and cache.dtype != kv.dtype:
        raise ArgumentError(
            "kv_cache_write", "kv_cache",
            f"expected dtype {dtype_name(kv.dtype)} (same as 'kv') or fp8_e4m3, got {dtype_name(cache.dtype)}",
        )


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, call: BoundCall) -> str | None:
    """Written rows within tolerance of the reference; every other row bit-identical to it."""
    slots = call.tensors["slot_mapping"].to("cpu").long()
    out = out.to("cpu")
    ref = ref.to("cpu")
    D = out.shape[-1]
    o, r = out.reshape(-1, D), ref.reshape(-1, D)
    written = torch.zeros(o.shape[0], dtype=torch.bool)
    written[slots[slots >= 0]] = True
    o64 = o.to(torch.float64)
    if out.dtype == torch.float8_e4m3fn:
        # the reference may have run in float64: round it as the cache would, allow one e4m3 step
        r64 = r.to(torch.float64).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float64)
        atol, rtol = 2.0 ** -9, 2.0 ** -3
    else:
        r64 = r.to(torch.float64)
        atol, rtol = ELEMENTWISE_TOL[out.dtype]
    ow, rw = o64[written], r64[written]
    bad = ~((ow - rw).abs() <= atol + rtol * rw.abs())
    if bool(bad.any()):
        first_bad = int(bad.any(dim=-1).nonzero()[0, 0])
        slot = int(written.nonzero()[first_bad, 0])
        return (f"{int(bad.sum())} written element(s) off (atol={atol}, rtol={rtol}), first in slot {slot}: "
                f"got {ow[first_bad][bad[first_bad]][:4].tolist()}, expected {rw[first_bad][bad[first_bad]][:4].tolist()}")
    # Untouched rows keep what they held: kernel and reference start from the same contents
    # (kv_cache is an in-out role), so every unaddressed row must be bit-identical.
    ou, ru = o64[~written], r.to(torch.float64).reshape(-1, D)[~written]
    same = (ou == ru) | (ou.isnan() & ru.isnan())
    if not bool(same.all()):
        rows = (~same).any(dim=-1).nonzero()[:, 0]
        first = int((~written).nonzero()[int(rows[0]), 0])
        return f"{len(rows)} slot(s) not addressed by slot_mapping were modified, first slot {first}"
    return None


def make_inputs(case, gen, device):
    T, D, ps, P = case["T"], case.get("D", 576), case["page_size"], case["pages"]
    dtype = case["dtype"]
    cache_dtype = case.get("cache_dtype", dtype)
    fp8 = cache_dtype == torch.float8_e4m3fn
    kv_scale = case.get("kv_scale", 0.05 if fp8 else 1.0)
    n_slots = P * ps
    pad = case.get("padding", 0)  # rows with slot -1
    assert T - pad <= n_slots, "more rows than cache slots"
    slots = torch.randperm(n_slots, generator=gen)[: T - pad]
    if T - pad >= 3 and ps > 1:
        # a page's last and first offsets, and the cache's last slot
        fixed = torch.tensor([ps - 1, ps, n_slots - 1])
        slots = torch.cat([fixed, slots[~torch.isin(slots, fixed)][: T - pad - 3]])
    slot_mapping = torch.cat([slots, torch.full((pad,), -1, dtype=torch.int64)])
    slot_mapping = slot_mapping[torch.randperm(T, generator=gen)]
    # prior cache contents: large finite values, distinct from what gets written
    prior = randn((P, ps, D), torch.float32, gen, "cpu", scale=8.0 if fp8 else 64.0)
    kv_values = randn((T, D), torch.float32, gen, "cpu", scale=kv_scale)
    if fp8 and T > pad:
        first_written = int((slot_mapping >= 0).nonzero()[0, 0])
        kv_values[first_written, 0] = 1000.0 * kv_scale  # beyond e4m3's range: clamped, never NaN
    return {
        "kv": kv_values.to(dtype).to(device),
        "slot_mapping": slot_mapping.to(device),
        "kv_cache": prior.to(cache_dtype).to(device),
        "kv_scale": kv_scale,
    }


def cost(call: BoundCall) -> Cost:
    t = call.tensors
    T, D = t["kv"].shape
    written = T * D * t["kv_cache"].element_size()  # at most: padding rows write nothing
    return Cost(float(T * D), nbytes(t["kv"], t["slot_mapping"]) + written)


def grid(size: str) -> list[dict]:
    cases = []
    if size == "small":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases += [
                dict(T=1, D=1, page_size=1, pages=3, dtype=dtype),
                dict(T=5, D=7, page_size=4, pages=3, dtype=dtype, padding=2),
                dict(T=9, D=576, page_size=16, pages=2, dtype=dtype, padding=1),
                dict(T=3, D=4097, page_size=2, pages=3, dtype=dtype),
            ]
        cases += [
            dict(T=12, D=576, page_size=8, pages=3, dtype=torch.bfloat16, cache_dtype=torch.float8_e4m3fn,
                 padding=2),
            dict(T=4, D=33, page_size=4, pages=2, dtype=torch.float32, cache_dtype=torch.float8_e4m3fn),
            dict(T=0, D=576, page_size=16, pages=2, dtype=torch.bfloat16),
            dict(T=4, D=576, page_size=16, pages=2, dtype=torch.bfloat16, padding=4),
        ]
    else:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for ps in (1, 16, 64, 128):
                cases += [dict(T=1, D=576, page_size=ps, pages=64, dtype=dtype),
                          dict(T=777, D=576, page_size=ps, pages=8192 // ps + 1, dtype=dtype, padding=10)]
            cases.append(dict(T=8192, D=576, page_size=64, pages=160, dtype=dtype))
        for dtype in (torch.bfloat16, torch.float16):
            cases += [dict(T=777, D=576, page_size=64, pages=20, dtype=dtype, cache_dtype=torch.float8_e4m3fn,
                           padding=5),
                      dict(T=8192, D=576, page_size=64, pages=160, dtype=dtype, cache_dtype=torch.float8_e4m3fn)]
    return cases


def _label(case) -> str:
    cd = case.get("cache_dtype")
    return (f"T={case['T']} D={case.get('D', 576)} ps={case['page_size']} pages={case['pages']} "
            f"{dtype_name(case['dtype'])}" + (f" cache={dtype_name(cd)}" if cd else "")
            + (f" pad={case['padding']}" if case.get("padding") else ""))


SPEC = OpSpec(
    name="kv_cache_write",
    doc=__doc__,
    inputs=(
        TensorRole("kv", ("T", "D"), KV_DTYPES, "new rows (latent + rope part)"),
        TensorRole("slot_mapping", ("T",), (torch.int64,), "cache slot of each row; -1 skips it"),
    ),
    outputs=(
        TensorRole("kv_cache", ("P", "PS", "D"), CACHE_DTYPES,
                   "paged cache [pages, page_size, D]; in-out: always passed, other rows kept", inout=True),
    ),
    params=(ScalarParam("kv_scale", float, "stored = kv / kv_scale (the fp8 quantisation scale)",
                        default=1.0, check=lambda v: None if v > 0 else f"expected > 0, got {v}"),),
    reference=reference,
    primary="kv",
    tolerances=ELEMENTWISE_TOL,
    make_inputs=make_inputs,
    cost=cost,
    grid=grid,
    static_dims=("D",),
    check_values=_check_values,
    compare=compare,
    case_label=_label,
    presets={
        "small": [dict(T=64, D=576, page_size=64, pages=4, dtype=torch.float32)],
        "large": [dict(T=8192, D=576, page_size=64, pages=4096, dtype=torch.bfloat16),
                  dict(T=8192, D=576, page_size=64, pages=4096, dtype=torch.bfloat16,
                       cache_dtype=torch.float8_e4m3fn)]
        # a 64K-token prefill chunk written at once
        + [dict(T=65536, D=576, page_size=64, pages=4096, dtype=torch.bfloat16, cache_dtype=c)
           for c in (torch.bfloat16, torch.float8_e4m3fn)],
    },
)


def kv_cache_write(kv, slot_mapping, kv_cache, *, kv_scale=1.0):
    """Write kv's rows into kv_cache (in place) at slot_mapping. Returns kv_cache."""
    from .. import get_registry

    if kv_cache is None:
        raise ArgumentError("kv_cache_write", "kv_cache", "the cache must be passed (it is updated in place)")
    return get_registry().call("kv_cache_write", kv=kv, slot_mapping=slot_mapping, kv_cache=kv_cache,
                               kv_scale=kv_scale)
