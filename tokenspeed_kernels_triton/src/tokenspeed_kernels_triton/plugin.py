"""The ``tokenspeed.kernels`` entry point of the Triton kernel package.

Registration is cheap and never touches a GPU: each kernel module declares its requirements
(devices, dtypes, a ``supports`` predicate) beside the kernel it guards. Kernels compile on their
first call. Under ``TRITON_INTERPRET=1`` the kernels also accept CPU tensors (that is how CI runs
them); otherwise they are CUDA-only.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import tokenspeed_core
from tokenspeed_core import Priority, Registry

BACKEND = "triton"

# One module per op family (FlashInfer style); each has register(registry, common).
KERNEL_MODULES = (
    "mla_decode",
    "mla_prefill",
    "rms_norm",
    "rope",
    "silu_and_mul",
    "kv_cache_write",
    "sample",
    "moe",
)


@dataclass(frozen=True)
class Common:
    """What every kernel module passes to ``registry.register``."""

    backend: str
    devices: tuple[str, ...]
    priority: int
    unavailable: str

    def kwargs(self) -> dict:
        return dict(backend=self.backend, devices=self.devices, priority=self.priority,
                    unavailable=self.unavailable)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def sm_count(device) -> int:
    """SMs of a CUDA device (what split and tile planners fill); 4 pretend SMs elsewhere (the
    interpreter), so planning logic is exercised by the CPU tests."""
    if device.type != "cuda":
        return 4
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def common() -> Common:
    missing = "" if importlib.util.find_spec("triton") else "the 'triton' package is not installed"
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    return Common(BACKEND, devices, Priority.PORTABLE, missing)


@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    c = common()
    for name in KERNEL_MODULES:
        if name not in registry.specs:
            continue  # this core does not define the op family
        if c.unavailable:  # triton missing: still list the op, with the reason
            registry.register(name, _unavailable, doc="Triton kernel", **c.kwargs())
            continue
        mod = importlib.import_module(f"{__package__}.{name}")
        mod.register(registry, c)


def _unavailable(**kwargs) -> None:  # pragma: no cover - never selected (unavailable is set)
    raise RuntimeError("tokenspeed_kernels_triton: triton is not installed")
