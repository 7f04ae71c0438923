"""Malformed variants of a valid call, one defect each, for the bad-input checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .._spec import OpSpec, dtype_name


def _wrong_dtype(allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    for d in (torch.float64, torch.int64, torch.int16, torch.float32, torch.bfloat16):
        if d not in allowed:
            return d
    return torch.uint8


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every stride doubled in the last dim."""
    wide = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def bad_input_variants(spec: OpSpec, args: dict[str, Any]) -> Iterator[tuple[str, dict, str]]:
    """Yield (label, args with one defect, name of the argument at fault)."""
    seen: set[str] = set()
    for role in spec.inputs:
        t = args.get(role.name)
        if not isinstance(t, torch.Tensor):
            continue
        shared = [i for i, s in enumerate(role.shape) if isinstance(s, str) and s in seen]
        seen.update(s for s in role.shape if isinstance(s, str))
        if shared:
            i = shared[0]
            shape = list(t.shape)
            shape[i] += 1
            yield (f"{role.name} dim {i} ({role.shape[i]}) disagrees with an earlier argument",
                   {**args, role.name: torch.zeros(shape, dtype=t.dtype, device=t.device)}, role.name)
        bad = _wrong_dtype(role.dtypes)
        yield (f"{role.name} dtype {dtype_name(bad)}", {**args, role.name: t.to(bad)}, role.name)
        yield (f"{role.name} extra dim", {**args, role.name: t.unsqueeze(0)}, role.name)
        if t.dim() >= 1 and t.shape[-1] > 1 and role.contiguous:
            yield (f"{role.name} non-contiguous", {**args, role.name: _non_contiguous(t)}, role.name)
        fixed = [i for i, s in enumerate(role.shape) if isinstance(s, int)]
        if fixed:
            i = fixed[0]
            shape = list(t.shape)
            shape[i] += 1
            yield (f"{role.name} dim {i} != {role.shape[i]}",
                   {**args, role.name: torch.zeros(shape, dtype=t.dtype, device=t.device)}, role.name)
        # a wrong device is only detectable against other tensors: the majority device wins,
        # the earliest on a tie
        others = [n for n, v in args.items() if isinstance(v, torch.Tensor) and n != role.name]
        first = next(n for n, v in args.items() if isinstance(v, torch.Tensor))
        if len(others) >= 2 or (others and role.name != first):
            yield (f"{role.name} on device meta", {**args, role.name: t.to("meta")}, role.name)
    for p in spec.params:
        if p.type in (float, int) and p.default is not None:
            yield (f"{p.name} given as a string", {**args, p.name: "1"}, p.name)
