"""Op specs: the schema and the meaning of an op family.

An :class:`OpSpec` names the tensor roles with symbolic shapes and allowed dtypes, the scalar
parameters, and the torch reference that *defines* what the op computes. Implementations register
against the spec (see ``_registry.py``); the spec validates every call before any of them runs, so
a kernel never sees a malformed argument and every error names the argument at fault.

Calling convention (destination passing): an implementation is called as
``fn(**inputs, **outputs, **params)`` and writes its outputs in place. Outputs are allocated by the
spec when the caller passes none, which keeps kernels graph-capturable and lets the conformance kit
poison outputs before the call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import ArgumentError

REQUIRED = object()

# dtypes by short name, used in presets, CLI options and reports.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class TensorRole:
    """One tensor argument of an op.

    shape: per-dimension symbol (str, bound across roles) or fixed size (int).
    dtypes: allowed dtypes. ``same_dtype_as`` ties this role's dtype to another role's.
    For outputs, the allocated dtype is ``same_dtype_as``'s dtype, else ``dtypes[0]``.
    ``inout`` marks an output whose prior contents are part of the meaning (a KV cache written in
    place): the caller always passes it, and the conformance kit starts kernel and reference from
    the same contents instead of poisoning it.
    """

    name: str
    shape: tuple[str | int, ...]
    dtypes: tuple[torch.dtype, ...]
    doc: str = ""
    optional: bool = False
    same_dtype_as: str | None = None
    contiguous: bool = True
    inout: bool = False
    present_if: str | None = None  # an output that exists only when this optional input is given


@dataclass(frozen=True)
class ScalarParam:
    """A non-tensor argument. ``static`` params are part of the selection signature."""

    name: str
    type: type
    doc: str = ""
    default: Any = REQUIRED
    choices: tuple | None = None
    static: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a reason when the value is bad


@dataclass(frozen=True)
class Cost:
    """Work of one call for the benchmark: floating-point operations and the fewest bytes moved."""

    flops: float
    bytes: float


@dataclass(frozen=True)
class Signature:
    """What selection is decided on (and cached by): device, dtypes, static dims and params.

    ``supports`` predicates of implementations see only this, which is what makes the cached
    decision valid for every call with the same signature.
    """

    op: str
    device: str  # "cpu", "cuda", ...
    capability: tuple[int, int] | None
    dtypes: tuple[tuple[str, torch.dtype], ...]
    dims: tuple[tuple[str, int], ...]
    params: tuple[tuple[str, Any], ...]
    present: tuple[str, ...]  # optional roles that were given

    def dtype(self, role: str) -> torch.dtype | None:
        return dict(self.dtypes).get(role)

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    def describe(self) -> str:
        dt = ", ".join(f"{k}={dtype_name(v)}" for k, v in self.dtypes)
        dims = ", ".join(f"{k}={v}" for k, v in self.dims)
        params = ", ".join(f"{k}={v}" for k, v in self.params)
        cap = f" sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"{self.op}[{self.device}{cap}; {dt}; {dims}" + (f"; {params}" if params else "") + "]"


@dataclass
class BoundCall:
    """A validated call: tensors by role, params by name, symbol values."""

    spec: OpSpec
    tensors: dict[str, torch.Tensor | None]
    params: dict[str, Any]
    dims: dict[str, int]
    device: torch.device

    def kwargs(self) -> dict[str, Any]:
        return {**self.tensors, **self.params}

    def outputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors[r.name] for r in self.spec.outputs)


Case = Mapping[str, Any]


@dataclass
class OpSpec:
    """An op family: schema, meaning (the reference), and what tests and benchmarks need."""

    name: str
    doc: str
    inputs: tuple[TensorRole, ...]
    outputs: tuple[TensorRole, ...]
    params: tuple[ScalarParam, ...]
    reference: Callable[..., None]
    # dtype of this role picks the tolerance and names the call's precision in reports
    primary: str
    tolerances: Mapping[torch.dtype, tuple[float, float]]  # dtype -> (atol, rtol)
    make_inputs: Callable[[Case, torch.Generator, torch.device], dict[str, Any]]
    cost: Callable[[BoundCall], Cost]
    grid: Callable[[str], list[dict]]  # "small" (CPU, interpreters) or "full" (GPU)
    presets: Mapping[str, list[dict]] = field(default_factory=dict)
    static_dims: tuple[str, ...] = ()
    dim_params: Mapping[str, str] = field(default_factory=dict)  # symbol -> int param that sets it
    check_values: Callable[[BoundCall], None] | None = None  # cross-argument checks, no host sync
    # compare(out, ref, call) -> None or a failure text; default: elementwise atol/rtol
    compare: Callable[[str, torch.Tensor, torch.Tensor, BoundCall], str | None] | None = None
    case_label: Callable[[Case], str] | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.inputs + self.outputs] + [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate argument names in {names}")

    # -- schema -------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[TensorRole, ...]:
        return self.inputs + self.outputs

    def role(self, name: str) -> TensorRole:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def arg_names(self) -> list[str]:
        return [r.name for r in self.roles] + [p.name for p in self.params]

    # -- validation ---------------------------------------------------------------------------
    def bind(self, kwargs: Mapping[str, Any], *, allocate: bool = True) -> BoundCall:
        """Validate a call and allocate missing outputs. Raises ArgumentError naming the culprit."""
        unknown = set(kwargs) - set(self.arg_names())
        if unknown:
            raise ArgumentError(
                self.name, sorted(unknown)[0], f"unknown argument; expected one of {self.arg_names()}"
            )
        dims: dict[str, int] = {}
        tensors: dict[str, torch.Tensor | None] = {}
        device, device_from = _common_device(self.roles, kwargs)
        for role in self.inputs:
            t = kwargs.get(role.name)
            if t is None:
                if not role.optional:
                    raise ArgumentError(self.name, role.name, "required tensor is missing")
                tensors[role.name] = None
                continue
            self._check_tensor(role, t, dims, tensors)
            if t.device != device:
                raise ArgumentError(
                    self.name, role.name, f"expected device {device} ({device_from}), got {t.device}",
                )
            tensors[role.name] = t
        params = self.bind_params(kwargs)
        for sym, pname in self.dim_params.items():
            if params.get(pname) is not None:
                dims.setdefault(sym, params[pname])
                if dims[sym] != params[pname]:
                    raise ArgumentError(self.name, pname, f"is {params[pname]} but {sym}={dims[sym]} from the inputs")
        for role in self.outputs:
            t = kwargs.get(role.name)
            if role.present_if is not None and tensors.get(role.present_if) is None:
                if t is not None:
                    raise ArgumentError(self.name, role.name,
                                        f"only exists when '{role.present_if}' is given; pass None")
                tensors[role.name] = None
                continue
            if t is None:
                if role.inout:
                    raise ArgumentError(self.name, role.name, "in-out tensor is required (it is updated in place)")
                if not allocate:
                    raise ArgumentError(self.name, role.name, "output tensor is missing")
                t = self._allocate(role, dims, tensors, device)
            else:
                self._check_tensor(role, t, dims, tensors)
                if t.device != device:
                    raise ArgumentError(
                        self.name, role.name, f"expected device {device} ({device_from}), got {t.device}",
                    )
            tensors[role.name] = t
        call = BoundCall(self, tensors, params, dims, device)
        if self.check_values is not None:
            self.check_values(call)
        return call

    def _check_tensor(self, role: TensorRole, t: Any, dims: dict[str, int], tensors: dict) -> None:
        op = self.name
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(op, role.name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(role.shape):
            raise ArgumentError(
                op, role.name,
                f"expected {len(role.shape)} dims {_shape_text(role.shape)}, got shape {tuple(t.shape)}",
            )
        for i, (sym, size) in enumerate(zip(role.shape, t.shape, strict=True)):
            if isinstance(sym, int):
                if size != sym:
                    raise ArgumentError(
                        op, role.name,
                        f"dim {i} must be {sym} (shape {_shape_text(role.shape)}), got shape {tuple(t.shape)}",
                    )
            elif sym in dims and dims[sym] != size:
                raise ArgumentError(
                    op, role.name,
                    f"dim {i} ({sym}) is {size} but {sym}={dims[sym]} from an earlier argument "
                    f"(expected shape {_shape_text(role.shape, dims)}, got {tuple(t.shape)})",
                )
            else:
                dims[sym] = size
        allowed = role.dtypes
        if role.same_dtype_as is not None and tensors.get(role.same_dtype_as) is not None:
            allowed = (tensors[role.same_dtype_as].dtype,)
            if t.dtype not in allowed:
                raise ArgumentError(
                    op, role.name,
                    f"expected dtype {dtype_name(allowed[0])} (same as '{role.same_dtype_as}'), "
                    f"got {dtype_name(t.dtype)}",
                )
        if t.dtype not in allowed:
            raise ArgumentError(
                op, role.name,
                f"expected dtype in {[dtype_name(d) for d in allowed]}, got {dtype_name(t.dtype)}",
            )
        if role.contiguous and not t.is_contiguous():
            raise ArgumentError(
                op, role.name, f"expected a contiguous tensor, got strides {tuple(t.stride())}"
            )

    def bind_params(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The scalar params of a call, checked and coerced as ``bind`` does (also
        ``OpPlan.run``'s slow path for scalars)."""
        params: dict[str, Any] = {}
        for p in self.params:
            v = kwargs.get(p.name, p.default)
            if v is REQUIRED:
                raise ArgumentError(self.name, p.name, "required parameter is missing")
            if v is not None:
                if p.type is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                if isinstance(v, torch.Tensor) or not isinstance(v, p.type) or (
                    p.type is int and isinstance(v, bool)
                ):
                    raise ArgumentError(
                        self.name, p.name, f"expected {p.type.__name__}, got {type(v).__name__} {v!r}"
                    )
                if p.type is float and not math.isfinite(v):
                    raise ArgumentError(self.name, p.name, f"expected a finite float, got {v}")
                if p.choices is not None and v not in p.choices:
                    raise ArgumentError(self.name, p.name, f"expected one of {p.choices}, got {v!r}")
                if p.check is not None and (reason := p.check(v)):
                    raise ArgumentError(self.name, p.name, reason)
            params[p.name] = v
        return params

    def _allocate(self, role: TensorRole, dims: dict[str, int], tensors: dict, device) -> torch.Tensor:
        shape = []
        for sym in role.shape:
            if isinstance(sym, int):
                shape.append(sym)
            elif sym in dims:
                shape.append(dims[sym])
            else:
                raise ArgumentError(
                    self.name, role.name, f"cannot allocate: size of '{sym}' is unknown; pass the output"
                )
        src = tensors.get(role.same_dtype_as) if role.same_dtype_as else None
        dtype = src.dtype if src is not None else role.dtypes[0]
        return torch.empty(shape, dtype=dtype, device=device)

    # -- selection signature ------------------------------------------------------------------
    def signature(self, call: BoundCall, capability: tuple[int, int] | None) -> Signature:
        dtypes = tuple((n, t.dtype) for n, t in call.tensors.items() if t is not None)
        dims = tuple((d, call.dims[d]) for d in self.static_dims if d in call.dims)
        params = tuple((p.name, call.params[p.name]) for p in self.params if p.static)
        present = tuple(r.name for r in self.inputs if r.optional and call.tensors[r.name] is not None)
        return Signature(self.name, call.device.type, capability, dtypes, dims, params, present)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.tolerances[dtype]

    def label(self, case: Case) -> str:
        if self.case_label is not None:
            return self.case_label(case)
        return ",".join(f"{k}={_short(v)}" for k, v in case.items())

    def with_(self, **changes: Any) -> OpSpec:
        return dataclasses.replace(self, **changes)


def _common_device(roles: Sequence[TensorRole], kwargs: Mapping[str, Any]) -> tuple[torch.device, str]:
    """The device most tensor arguments are on (ties: the earliest), so an error names the odd one out."""
    seen: dict[torch.device, list[str]] = {}
    for r in roles:
        t = kwargs.get(r.name)
        if isinstance(t, torch.Tensor):
            seen.setdefault(t.device, []).append(r.name)
    if not seen:
        return torch.device("cpu"), "no tensor given"
    device, names = max(seen.items(), key=lambda kv: len(kv[1]))  # max keeps the first on ties
    if len(seen) == 1:
        return device, f"the device of '{names[0]}'"
    return device, f"the device of {', '.join(repr(n) for n in names)}"


def _short(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"[{len(v)} items]"
    return str(v).replace(" ", "")


def _shape_text(shape: Sequence[str | int], dims: Mapping[str, int] | None = None) -> str:
    parts = []
    for s in shape:
        if isinstance(s, str) and dims and s in dims:
            parts.append(f"{s}={dims[s]}")
        else:
            parts.append(str(s))
    return "[" + ", ".join(parts) + "]"


def upcast(t: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """Floating tensors to ``dtype`` on CPU (the conformance kit's float64 reference)."""
    if t is None:
        return None
    if t.is_floating_point():
        return t.detach().to("cpu").to(dtype)
    return t.detach().to("cpu")
