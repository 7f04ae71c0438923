"""The ``tokenspeed.kernels`` entry point of the CuTe DSL package (placeholder until the kernels land)."""

from __future__ import annotations

import importlib.util

import tokenspeed_core
from tokenspeed_core import Priority, Registry

BACKEND = "cute"


def missing_dependency() -> str:
    if importlib.util.find_spec("cutlass") is None:
        return "nvidia-cutlass-dsl is not installed (pip install 'tokenspeed[blackwell]')"
    return ""


@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    if "mla_decode" not in registry.specs:
        return
    reason = missing_dependency() or "the CuTe DSL mla_decode kernel is not written yet"
    registry.register(
        "mla_decode", _not_available, backend=BACKEND, devices=("cuda",), capability=((9, 0), (10, 3)),
        priority=Priority.SPECIALISED, unavailable=reason, doc="CuTe DSL MLA decode (sm_90a / sm_100a)",
    )


def _not_available(**kwargs) -> None:  # never selected: registered as unavailable
    raise RuntimeError("tokenspeed_kernels_blackwell: mla_decode is not available")
