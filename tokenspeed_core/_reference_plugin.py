"""The built-in plugin: defines the core op families and registers their torch references.

It goes through the same hooks as any third-party plugin; the references run anywhere torch runs
and are the lowest priority band, so any kernel that supports a call wins over them.
"""

from __future__ import annotations

from ._hooks import hookimpl
from ._registry import Priority, Registry
from .ops import all_specs


@hookimpl
def tokenspeed_register_ops(registry: Registry) -> None:
    for spec in all_specs():
        registry.add_op(spec)


@hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    for spec in all_specs():
        registry.register(
            spec.name, spec.reference, backend="reference", devices=("cpu", "cuda"),
            priority=Priority.REFERENCE, doc="torch reference (defines the op's meaning)",
        )
