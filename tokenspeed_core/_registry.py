"""The kernel registry: implementations registered against op specs, and selection.

Selection picks, for a call's :class:`Signature`, the highest-priority implementation whose
declared requirements (device, compute capability, dtypes) and ``supports`` predicate accept it.
The decision is cached per signature. ``explain`` lists every candidate with the reason it was
accepted or rejected. A backend can be forced per op by environment variable
(``TOKENSPEED_KERNEL_MLA_DECODE=triton``) or by the ``use_backend`` context manager; a forced
backend that cannot run the call raises, it never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from . import _device
from ._errors import ArgumentError, KernelSelectionError
from ._spec import BoundCall, OpSpec, Signature, dtype_name


class Priority(IntEnum):
    """Named priority bands; stand inside one (``Priority.PERFORMANT + 5`` is fine)."""

    REFERENCE = 0  # the torch reference: always correct, never fast
    PORTABLE = 100  # runs on many devices (Triton)
    PERFORMANT = 200  # tuned for a device family
    SPECIALISED = 300  # hand-written for one architecture (CuTe DSL sm_90a / sm_100a)
    PLUGIN = 400  # a third party that wants to win over the built-in backends


SupportsFn = Callable[[Signature], "str | None"]


@dataclass
class KernelImpl:
    """One implementation of one op. ``fn(**inputs, **outputs, **params)`` writes the outputs."""

    op: str
    backend: str
    fn: Callable[..., None]
    devices: tuple[str, ...] = ("cpu", "cuda")
    capability: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
    dtypes: tuple[torch.dtype, ...] | None = None  # of the spec's primary role; None = all
    supports: SupportsFn | None = None
    priority: int = Priority.PORTABLE
    plugin: str = "?"
    doc: str = ""
    status: str = ""  # e.g. "compiled, not run on hardware"
    unavailable: str = ""  # why it cannot run in this process at all (missing package, ...)
    # optional per-signature priority: a kernel that can run a shape but is known to lose there
    # (measured) steps down without refusing, so it can still be forced and benchmarked
    rank: Callable[[Signature], int] | None = None

    def priority_for(self, sig: Signature) -> int:
        if self.rank is None:
            return self.priority
        try:
            return int(self.rank(sig))
        except Exception:  # a broken rank function must not take selection down
            return self.priority

    def reject_reason(self, sig: Signature, primary: str) -> str | None:
        """Why this implementation cannot run ``sig``; None when it can."""
        if self.unavailable:
            return f"unavailable: {self.unavailable}"
        if sig.device not in self.devices:
            return f"device {sig.device} not in {list(self.devices)}"
        lo, hi = self.capability
        if (lo or hi) and sig.capability is None:
            return f"needs a CUDA compute capability, device is {sig.device}"
        if lo and sig.capability < lo:
            return f"compute capability {_cc(sig.capability)} < required {_cc(lo)}"
        if hi and sig.capability > hi:
            return f"compute capability {_cc(sig.capability)} > supported {_cc(hi)}"
        pdtype = sig.dtype(primary)
        if self.dtypes is not None and pdtype not in self.dtypes:
            return f"{primary} dtype {dtype_name(pdtype)} not in {[dtype_name(d) for d in self.dtypes]}"
        if self.supports is not None:
            try:
                reason = self.supports(sig)
            except Exception as exc:  # a broken predicate must not take selection down
                return f"supports() raised {type(exc).__name__}: {exc}"
            if reason:
                return str(reason)
        return None


def _cc(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


@dataclass
class Candidate:
    impl: KernelImpl
    reason: str | None  # None: accepted
    selected: bool = False
    priority: int = 0  # for this signature (see KernelImpl.rank)


@dataclass
class FailedPlugin:
    name: str
    stage: str  # "import" or "register"
    error: str


_overrides: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tokenspeed_overrides", default=None
)


def env_override(op: str) -> str | None:
    return os.environ.get(f"TOKENSPEED_KERNEL_{op.upper()}") or None


@contextlib.contextmanager
def use_backend(**ops: str) -> Iterator[None]:
    """Force backends for this block: ``with use_backend(mla_decode="triton"): ...``."""
    token = _overrides.set({**(_overrides.get() or {}), **ops})
    try:
        yield
    finally:
        _overrides.reset(token)


def forced_backend(op: str) -> tuple[str | None, str]:
    """The backend forced for ``op`` and by what, context manager first."""
    ctx = (_overrides.get() or {}).get(op)
    if ctx:
        return ctx, "use_backend()"
    env = env_override(op)
    if env:
        return env, f"TOKENSPEED_KERNEL_{op.upper()}"
    return None, ""


@dataclass
class Registry:
    """Op specs and their implementations. Plugins receive one through their hook."""

    specs: dict[str, OpSpec] = field(default_factory=dict)
    impls: dict[str, list[KernelImpl]] = field(default_factory=dict)
    failed_plugins: list[FailedPlugin] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    _cache: dict[tuple, KernelImpl] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _current_plugin: str = field(default="?", repr=False)

    # -- registration -------------------------------------------------------------------------
    def add_op(self, spec: OpSpec) -> None:
        with self._lock:
            if spec.name in self.specs and self.specs[spec.name] is not spec:
                raise ValueError(f"op '{spec.name}' is already defined")
            self.specs[spec.name] = spec
            self.impls.setdefault(spec.name, [])

    def register(
        self,
        op: str,
        fn: Callable[..., None] | None = None,
        *,
        backend: str,
        devices: Sequence[str] = ("cpu", "cuda"),
        capability: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None),
        dtypes: Sequence[torch.dtype] | None = None,
        supports: SupportsFn | None = None,
        priority: int = Priority.PORTABLE,
        doc: str = "",
        status: str = "",
        unavailable: str = "",
        rank: Callable[[Signature], int] | None = None,
    ):
        """Register ``fn`` as ``backend``'s implementation of ``op``. Usable as a decorator."""

        def add(f: Callable[..., None]) -> Callable[..., None]:
            with self._lock:
                if op not in self.specs:
                    raise KeyError(f"unknown op '{op}'; known: {sorted(self.specs)}")
                if any(i.backend == backend for i in self.impls[op]):
                    raise ValueError(f"op '{op}' already has a backend named '{backend}'")
                impl = KernelImpl(
                    op=op, backend=backend, fn=f, devices=tuple(devices), capability=capability,
                    dtypes=tuple(dtypes) if dtypes is not None else None, supports=supports,
                    priority=int(priority), plugin=self._current_plugin,
                    doc=doc or (f.__doc__ or "").strip().split("\n")[0], status=status,
                    unavailable=unavailable, rank=rank,
                )
                self.impls[op].append(impl)
                self._cache.clear()
            return f

        return add(fn) if fn is not None else add

    def unregister_plugin(self, plugin: str) -> None:
        """Drop everything a plugin registered (used when its hook fails half-way)."""
        with self._lock:
            for op in self.impls:
                self.impls[op] = [i for i in self.impls[op] if i.plugin != plugin]
            self._cache.clear()

    @contextlib.contextmanager
    def registering_as(self, plugin: str) -> Iterator[None]:
        prev, self._current_plugin = self._current_plugin, plugin
        try:
            yield
        finally:
            self._current_plugin = prev

    # -- lookup -------------------------------------------------------------------------------
    def spec(self, op: str) -> OpSpec:
        try:
            return self.specs[op]
        except KeyError:
            raise KeyError(f"unknown op '{op}'; known: {sorted(self.specs)}") from None

    def implementations(self, op: str) -> list[KernelImpl]:
        self.spec(op)
        return sorted(self.impls[op], key=lambda i: (-i.priority, i.backend))

    def backend(self, op: str, backend: str) -> KernelImpl:
        for impl in self.impls.get(op, []):
            if impl.backend == backend:
                return impl
        known = [i.backend for i in self.impls.get(op, [])]
        raise KernelSelectionError(f"{op}: no backend named '{backend}'; registered: {known}")

    # -- selection ----------------------------------------------------------------------------
    def signature(self, call: BoundCall) -> Signature:
        return call.spec.signature(call, _device.capability(call.device))

    def candidates(self, sig: Signature,
                   forced: tuple[str | None, str] | None = None) -> list[Candidate]:
        """Every implementation's verdict on ``sig``; ``forced``: (backend, by whom), default the
        override in force now (``OpPlan.explain`` passes the one of its planning)."""
        spec = self.spec(sig.op)
        out = [Candidate(i, i.reject_reason(sig, spec.primary), priority=i.priority_for(sig))
               for i in self.implementations(sig.op)]
        out.sort(key=lambda c: (-c.priority, c.impl.backend))
        forced, _ = forced if forced is not None else forced_backend(sig.op)
        for c in out:
            if forced and c.impl.backend != forced and c.reason is None:
                c.reason = f"not the forced backend '{forced}'"
        for c in out:
            if c.reason is None:
                c.selected = True
                break
        return out

    def select(self, call: BoundCall) -> KernelImpl:
        return self._select(self.signature(call))[0]

    def _select(self, sig: Signature) -> tuple[KernelImpl, tuple[str | None, str]]:
        """The implementation for ``sig`` (cached) and the override it was chosen under."""
        forced, by = forced_backend(sig.op)
        key = (sig, forced)
        hit = self._cache.get(key)
        if hit is not None:
            return hit, (forced, by)
        chosen = _chosen(sig, self.candidates(sig, (forced, by)), forced, by)
        with self._lock:
            self._cache[key] = chosen
        return chosen, (forced, by)

    def explain(self, op: str, **kwargs: Any) -> str:
        """Every candidate for this call and why it was accepted or rejected."""
        call = self.spec(op).bind(kwargs)
        sig = self.signature(call)
        return format_explain(sig, self.candidates(sig))

    def call(self, op: str, **kwargs: Any):
        """Validate, select and run; returns the outputs (one tensor, or a tuple)."""
        call = self.spec(op).bind(kwargs)
        impl = self.select(call)
        impl.fn(**call.kwargs())
        outs = call.outputs()
        return outs[0] if len(outs) == 1 else outs

    def plan(self, op: str, **kwargs: Any) -> OpPlan:
        """Validate and select once for calls shaped like this one; ``.run(**kwargs)`` repeats it.

        Binds the example call fully (every check ``call`` makes, the same errors), selects the
        kernel by the same rules as ``select`` (forced backends included, the same errors) and
        records the guard ``OpPlan.run`` checks; runs nothing. See :class:`OpPlan`.
        """
        call = self.spec(op).bind(kwargs)
        sig = self.signature(call)
        impl, forced = self._select(sig)
        return OpPlan(self, call, kwargs, impl, sig, forced)


def _chosen(sig: Signature, cands: list[Candidate], forced: str | None, by: str) -> KernelImpl:
    """The selected candidate's implementation, or the selection error (``select`` and ``plan``)."""
    chosen = next((c.impl for c in cands if c.selected), None)
    if chosen is not None:
        return chosen
    if forced:
        if not any(c.impl.backend == forced for c in cands):
            raise KernelSelectionError(
                f"{sig.op}: backend '{forced}' forced by {by} is not registered; "
                f"registered: {[c.impl.backend for c in cands]}"
            )
        raise KernelSelectionError(
            f"{sig.op}: backend '{forced}' forced by {by} cannot run this call:\n"
            + format_explain(sig, cands, (forced, by))
        )
    raise KernelSelectionError(f"{sig.op}: no implementation supports this call:\n"
                               + format_explain(sig, cands, (forced, by)))


def format_explain(sig: Signature, cands: list[Candidate],
                   forced: tuple[str | None, str] | None = None) -> str:
    """``sig`` and every candidate with its verdict. ``forced``: (backend, by whom) as it was when
    the candidates were computed; default: as it is now."""
    forced, by = forced if forced is not None else forced_backend(sig.op)
    lines = [f"{sig.describe()}" + (f"  (forced: {forced} by {by})" if forced else "")]
    if not cands:
        lines.append("  no implementation registered")
    for c in cands:
        mark = "SELECTED" if c.selected else ("ok      " if c.reason is None else "rejected")
        why = "" if c.reason is None else f": {c.reason}"
        lines.append(
            f"  {mark} {c.impl.backend:<12} prio {c.priority:<4} (plugin {c.impl.plugin}){why}"
        )
    return "\n".join(lines)


class OpPlan:
    """One op's validation and kernel choice, made once for calls shaped like an example call.

    ``Registry.plan(op, **example)`` (``tokenspeed_core.plan``) binds and validates the example as
    ``call`` does and selects the kernel; ``run(**kwargs)`` checks a guard and calls the kernel
    directly: no binding, no signature, no cache lookup, O(number of arguments) host work.

    The guard pins (a mismatch raises ``ArgumentError`` naming the argument; make a new plan):

    - the argument names passed to ``plan`` (missing or extra names are errors); a tensor passed
      as None stays None, and outputs not passed are allocated by every run, as ``call`` does;
    - every tensor's full shape, its dtype, its device (index included: it decides the compute
      capability) and, where the spec requires it, contiguity (``is_contiguous()``, the test
      ``bind`` makes; strides are otherwise free, as in ``call``);
    - the static params (those in the selection signature), by value.

    Why every dim and not only the signature's static dims, which are all ``supports`` sees:
    ``bind`` promised more than the signature for the example. Each shape symbol agrees across
    roles (mla_decode's B in q, page_table, cache_seqlens, out and lse), and an op's
    ``check_values`` reads non-static dims (mla_prefill: B+1 >= 1; moe: w13's 2 * Dff). Keeping
    those promises for a free dim would mean most of ``bind`` per call, while one exact shape
    compare per tensor keeps all of them. So the dims that are dynamic by design are pinned
    too: the batch, the cache's number of pages, the page table's width. Plan once per batch
    shape and run the plan for every layer (FlashInfer's split), or once per CUDA-graph bucket.

    Never checked (as in ``call``): the values inside tensors (sequence lengths, page ids, slots:
    no host sync), and which tensor object is passed (another layer's cache of the planned shape
    is fine). Non-static scalars (``softmax_scale``) may change between runs; each run checks
    them as ``call`` does (type, finite, choices, the param's own check).

    A plan pins its choice: a kernel registered later, a ``use_backend`` block or an environment
    override set after planning does not change it (make a new plan to pick them up), and it
    keeps its implementation even if that plugin is unregistered. It holds no tensors and never
    changes after construction, so one plan may run from several threads at once.
    """

    __slots__ = ("op", "spec", "impl", "signature", "_registry", "_forced", "_names", "_tensors",
                 "_absent", "_static", "_scalars", "_fill", "_allocate", "_outputs", "_single")

    def __init__(self, registry: Registry, call: BoundCall, kwargs: dict[str, Any], impl: KernelImpl,
                 sig: Signature, forced: tuple[str | None, str]):
        spec = call.spec
        self.op, self.spec, self.impl, self.signature = spec.name, spec, impl, sig
        self._registry, self._forced = registry, forced
        self._names = frozenset(kwargs)
        tensors, absent, allocate, fill = [], [], [], {}
        for role in spec.roles:
            t = call.tensors[role.name]
            if kwargs.get(role.name) is not None:
                tensors.append((role.name, tuple(t.shape), t.dtype, t.device, role.contiguous))
                continue
            if role.name in kwargs:
                absent.append(role.name)  # passed as None: must stay None
            if t is not None:  # an output bind allocated: every run allocates its own
                allocate.append((role.name, tuple(t.shape), t.dtype, t.device))
            else:
                fill[role.name] = None
        static, scalars = [], []
        for p in spec.params:
            if p.name not in kwargs:
                fill[p.name] = call.params[p.name]  # the default, pinned by the names check
            elif p.static:
                static.append((p.name, call.params[p.name]))
            else:
                scalars.append((p.name, p.type, p.type is float, p.choices, p.check))
        self._tensors, self._absent, self._allocate = tuple(tensors), tuple(absent), tuple(allocate)
        self._static, self._scalars, self._fill = tuple(static), tuple(scalars), fill
        self._outputs = tuple(r.name for r in spec.outputs)
        self._single = len(self._outputs) == 1

    @property
    def backend(self) -> str:
        return self.impl.backend

    def run(self, **kwargs: Any):
        """Check the guard, run the planned kernel; returns the outputs as ``call`` does."""
        if kwargs.keys() != self._names:
            raise self._names_error(kwargs)
        try:
            for name, shape, dtype, device, contiguous in self._tensors:
                t = kwargs[name]
                if (t.shape != shape or t.dtype != dtype or t.device != device
                        or (contiguous and not t.is_contiguous())):
                    raise self._tensor_error(name, t)
        except AttributeError:  # not a tensor
            raise self._tensor_error(name, kwargs[name]) from None
        for name in self._absent:
            if kwargs[name] is not None:
                raise self._absent_error(name, kwargs[name])
        args = {**self._fill, **kwargs}
        if not self._params_ok(kwargs):
            args.update(self._checked_params(kwargs))
        for name, shape, dtype, device in self._allocate:
            args[name] = torch.empty(shape, dtype=dtype, device=device)
        self.impl.fn(**args)
        if self._single:
            return args[self._outputs[0]]
        return tuple(args[n] for n in self._outputs)

    # -- guard helpers (the fast test inline, the slow path and the messages here) --------------
    def _params_ok(self, kwargs: dict[str, Any]) -> bool:
        """The common case: every scalar already has the param's exact type and passes its checks."""
        for name, value in self._static:
            v = kwargs[name]
            if v is not value and (type(v) is not type(value) or v != value):
                return False
        for name, typ, is_float, choices, check in self._scalars:
            v = kwargs[name]
            if (type(v) is not typ or (is_float and not math.isfinite(v))
                    or (choices is not None and v not in choices) or (check is not None and check(v))):
                return False
        return True

    def _checked_params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The spec's own param binding (its errors, its int -> float coercion), then the pins."""
        params = self.spec.bind_params(kwargs)
        for name, value in self._static:
            if type(params[name]) is not type(value) or params[name] != value:
                raise ArgumentError(
                    self.op, name, f"planned {value!r} (a static param: part of the kernel choice), "
                    f"got {kwargs[name]!r}; make a new plan",
                )
        return params

    def _tensor_error(self, name: str, t: Any) -> ArgumentError:
        _, shape, dtype, device, _ = next(g for g in self._tensors if g[0] == name)
        if not isinstance(t, torch.Tensor):
            msg = f"planned a tensor of shape {shape}, got {type(t).__name__}"
        elif tuple(t.shape) != shape:
            msg = f"planned shape {shape}, got {tuple(t.shape)}"
        elif t.dtype != dtype:
            msg = f"planned dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}"
        elif t.device != device:
            msg = f"planned device {device}, got {t.device}"
        else:
            msg = f"planned a contiguous tensor, got strides {tuple(t.stride())} for shape {shape}"
        return ArgumentError(self.op, name, msg + "; make a new plan")

    def _absent_error(self, name: str, t: Any) -> ArgumentError:
        what = "allocated by each run" if any(a[0] == name for a in self._allocate) else "not given"
        got = f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        return ArgumentError(self.op, name, f"planned None ({what}), got {got}; make a new plan")

    def _names_error(self, kwargs: dict[str, Any]) -> ArgumentError:
        extra = sorted(set(kwargs) - self._names)
        if extra:
            known = self.spec.arg_names()
            if extra[0] not in known:
                return ArgumentError(self.op, extra[0], f"unknown argument; expected one of {known}")
            return ArgumentError(self.op, extra[0], "was not passed to plan(); pass the arguments "
                                 "the plan was made with, or make a new plan")
        missing = sorted(self._names - set(kwargs))
        return ArgumentError(self.op, missing[0], "was passed to plan() and is missing; pass the "
                             "arguments the plan was made with, or make a new plan")

    # -- reporting ---------------------------------------------------------------------------
    def explain(self) -> str:
        """Every candidate's verdict under the override of planning time, then what run() checks."""
        cands = self._registry.candidates(self.signature, self._forced)
        lines = [format_explain(self.signature, cands, self._forced),
                 f"  plan: runs {self.backend} (plugin {self.impl.plugin}); run() checks:"]
        now = next((c.impl for c in cands if c.selected), None)
        if now is not self.impl:  # registered or unregistered since: the plan keeps its choice
            lines.insert(1, f"  (the registry changed since planning: a new plan would run "
                            f"{now.backend if now else 'nothing'})")
        for name, shape, dtype, device, contiguous in self._tensors:
            lines.append(f"    {name}: shape {shape} {dtype_name(dtype)} on {device}"
                         + (", contiguous" if contiguous else ""))
        for name, shape, dtype, device in self._allocate:
            lines.append(f"    {name}: not passed; each run allocates {shape} {dtype_name(dtype)} "
                         f"on {device}")
        for name in self._absent:
            if not any(a[0] == name for a in self._allocate):
                lines.append(f"    {name}: None")
        for name, value in self._static:
            lines.append(f"    {name} = {value!r} (static)")
        for name, *_ in self._scalars:
            lines.append(f"    {name}: any valid value")
        if self._fill:
            lines.append("    not passed, fixed: " + ", ".join(f"{k}={v!r}" for k, v in self._fill.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"OpPlan({self.op} -> {self.backend}, {self.signature.describe()})"


__all__ = [
    "ArgumentError", "Candidate", "FailedPlugin", "KernelImpl", "KernelSelectionError", "OpPlan",
    "Priority", "Registry", "forced_backend", "format_explain", "use_backend",
]
