"""Op families, one module each. ``ALL_SPECS`` is what the core defines out of the box.

Each module holds the spec (schema + torch reference + generators + cost) and a thin public
function of the op's name (``tokenspeed_core.ops.mla_decode.mla_decode(...)``) that validates,
selects a kernel through the registry and runs it. ``tokenspeed_core.ops.<op>`` is always the
module.
"""

from __future__ import annotations

import importlib

from .._spec import OpSpec

# Module names of the built-in op families.
OP_MODULES = (
    "mla_decode",
    "mla_prefill",
    "rms_norm",
    "rope",
    "silu_and_mul",
    "kv_cache_write",
    "sample",
    "moe",
)


def all_specs() -> list[OpSpec]:
    return [importlib.import_module(f"{__name__}.{name}").SPEC for name in OP_MODULES]
