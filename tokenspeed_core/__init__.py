"""tokenspeed_core: the kernel contract of TokenSpeed.

Op specs (schema + torch reference that defines the meaning), the registry that selects a kernel
per call and explains why, pluggy hooks with entry-point discovery, the conformance kit
(``tokenspeed_core.testing``) and the benchmark harness (``tokenspeed_core.bench``).

Imports torch, numpy and pluggy only: never the engine, triton or cutlass.
"""

from __future__ import annotations

import threading

from ._errors import ArgumentError, KernelSelectionError, PluginError, TokenSpeedError
from ._hooks import ENTRY_POINT_GROUP, KernelHookSpecs, hookimpl, hookspec, load_plugins
from ._registry import (
    KernelImpl,
    OpPlan,
    Priority,
    Registry,
    forced_backend,
    format_explain,
    use_backend,
)
from ._spec import BoundCall, Cost, OpSpec, ScalarParam, Signature, TensorRole

__version__ = "0.1.0"

_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, filled from the built-in and installed plugins on first use."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = build_registry()
    return _registry


def build_registry(entry_points: bool = True) -> Registry:
    """A fresh registry (tests and tools; the engine uses ``get_registry()``)."""
    from . import _reference_plugin

    reg = Registry()
    load_plugins(reg, builtins={"reference": _reference_plugin}, entry_points=entry_points)
    return reg


def reset_registry() -> None:
    """Forget the process-wide registry (after installing a plugin, or changing TOKENSPEED_PLUGINS)."""
    global _registry
    with _registry_lock:
        _registry = None


def explain(op: str, **kwargs) -> str:
    """Every implementation of ``op`` and why it is or is not selected for these arguments."""
    return get_registry().explain(op, **kwargs)


def plan(op: str, **kwargs) -> OpPlan:
    """Validate and select once for calls shaped like this one; ``plan.run(**kwargs)`` repeats it
    with only a guard check (see ``OpPlan`` for what the guard pins)."""
    return get_registry().plan(op, **kwargs)


__all__ = [
    "ArgumentError", "BoundCall", "Cost", "ENTRY_POINT_GROUP", "KernelHookSpecs", "KernelImpl",
    "KernelSelectionError", "OpPlan", "OpSpec", "PluginError", "Priority", "Registry", "ScalarParam",
    "Signature", "TensorRole", "TokenSpeedError", "build_registry", "explain", "format_explain",
    "forced_backend", "get_registry", "hookimpl", "hookspec", "load_plugins", "plan", "reset_registry",
    "use_backend",
]
