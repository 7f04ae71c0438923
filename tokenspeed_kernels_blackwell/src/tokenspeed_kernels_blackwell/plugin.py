"""The ``tokenspeed.kernels`` entry point of the CuTe DSL package.

Registers every op family this package implements. Importing it never needs nvidia-cutlass-dsl
or a GPU: without them the implementations are registered with ``unavailable=`` saying why.
"""

from __future__ import annotations

import tokenspeed_core
from tokenspeed_core import Priority, Registry

from . import mla_decode, mla_prefill

BACKEND = "cute"


def missing_dependency() -> str:
    return mla_decode.missing_dependency()


@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    if mla_decode.OP in registry.specs:
        # v2 (wgmma) passed the conformance kit on an H200 and beat the Triton kernel on 7 of the
        # 8 measured rows with >= 64 folded rows (H x q_len; all 6 compute-bound rows 1.34-1.52x;
        # lost b = 1, H 128, 16K, where fixed costs dominate and the signature has no batch); it
        # lost on every 16-row row (memory-bound, b = 1) (docs/perf/cute.md, run 2). So:
        # SPECIALISED for >= 64 rows, below the portable band elsewhere (used there only when
        # forced: TOKENSPEED_KERNEL_MLA_DECODE=cute).
        mla_decode.register(registry, BACKEND, Priority.PORTABLE - 10, preferred=Priority.SPECIALISED)
    if mla_prefill.OP in registry.specs:
        # passed the conformance kit on an H200 and beat the Triton kernel on all 8 measured rows
        # (1.14-1.70x; docs/perf/cute.md, runs P1-P2): SPECIALISED wherever it runs (sm_90a)
        mla_prefill.register(registry, BACKEND, Priority.SPECIALISED)
