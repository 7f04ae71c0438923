"""The ``tokenspeed.kernels`` entry point of the CuTe DSL package.

Registers every op family this package implements. Importing it never needs nvidia-cutlass-dsl
or a GPU: without them the implementations are registered with ``unavailable=`` saying why.
"""

from __future__ import annotations

import tokenspeed_core
from tokenspeed_core import Priority, Registry

from . import mla_decode

BACKEND = "cute"


def missing_dependency() -> str:
    return mla_decode.missing_dependency()


@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    if mla_decode.OP in registry.specs:
        # Correct on Hopper (conformance, H200) but slower than the Triton kernel on every preset
        # row measured with graph replay (docs/perf/cute.md): it stands below the portable band,
        # so it is used only when forced (TOKENSPEED_KERNEL_MLA_DECODE=cute) until the wgmma/TMA
        # version beats Triton; then it moves up to Priority.SPECIALISED.
        mla_decode.register(registry, BACKEND, Priority.PORTABLE - 10)
