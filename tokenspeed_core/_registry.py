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

    def candidates(self, sig: Signature) -> list[Candidate]:
        spec = self.spec(sig.op)
        out = [Candidate(i, i.reject_reason(sig, spec.primary), priority=i.priority_for(sig))
               for i in self.implementations(sig.op)]
        out.sort(key=lambda c: (-c.priority, c.impl.backend))
        forced, _ = forced_backend(sig.op)
        for c in out:
            if forced and c.impl.backend != forced and c.reason is None:
                c.reason = f"not the forced backend '{forced}'"
        for c in out:
            if c.reason is None:
                c.selected = True
                break
        return out

    def select(self, call: BoundCall) -> KernelImpl:
        sig = self.signature(call)
        forced, by = forced_backend(sig.op)
        key = (sig, forced)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cands = self.candidates(sig)
        chosen = next((c.impl for c in cands if c.selected), None)
        if chosen is None:
            if forced:
                if not any(c.impl.backend == forced for c in cands):
                    raise KernelSelectionError(
                        f"{sig.op}: backend '{forced}' forced by {by} is not registered; "
                        f"registered: {[c.impl.backend for c in cands]}"
                    )
                raise KernelSelectionError(
                    f"{sig.op}: backend '{forced}' forced by {by} cannot run this call:\n"
                    + format_explain(sig, cands)
                )
            raise KernelSelectionError(f"{sig.op}: no implementation supports this call:\n"
                                       + format_explain(sig, cands))
        with self._lock:
            self._cache[key] = chosen
        return chosen

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


def format_explain(sig: Signature, cands: list[Candidate]) -> str:
    forced, by = forced_backend(sig.op)
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


__all__ = [
    "ArgumentError", "Candidate", "FailedPlugin", "KernelImpl", "KernelSelectionError", "Priority",
    "Registry", "forced_backend", "format_explain", "use_backend",
]
