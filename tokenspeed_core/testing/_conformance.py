"""Conformance checks of implementations against their op's float64 reference."""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _device
from .._errors import ArgumentError, KernelSelectionError
from .._registry import KernelImpl, Registry, use_backend
from .._spec import BoundCall, OpSpec, dtype_name, upcast
from ._mutations import bad_input_variants

INT_POISON = -0x5EED  # any index-valued output never holds this


@dataclass
class CaseResult:
    op: str
    backend: str
    label: str
    status: str  # "pass", "fail", "skip", "error"
    detail: str = ""
    seed: int | None = None
    max_abs_err: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skip")


@dataclass
class BackendReport:
    op: str
    backend: str
    plugin: str
    device: str
    results: list[CaseResult] = field(default_factory=list)
    unavailable: str = ""  # registered as unable to run here: listed, not checked, not a failure

    @property
    def ok(self) -> bool:
        if self.unavailable:
            return True
        return all(r.ok for r in self.results) and any(r.status == "pass" for r in self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def format(self, verbose: bool = False) -> str:
        c = self.counts()
        head = (f"{self.op} / {self.backend} (plugin {self.plugin}, {self.device}): "
                + ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
                + ("" if self.ok else "  <-- FAILED"))
        if self.unavailable:
            return f"{self.op} / {self.backend} (plugin {self.plugin}): not checked, unavailable: {self.unavailable}"
        if not any(r.status == "pass" for r in self.results):
            head += "\n  no case ran: the backend supports none of the grid on this device"
        lines = [head]
        for r in self.results:
            if verbose or r.status in ("fail", "error"):
                seed = f" seed={r.seed}" if r.seed is not None else ""
                lines.append(f"  [{r.status}] {r.label}{seed}" + (f": {r.detail}" if r.detail else ""))
        return "\n".join(lines)


@dataclass
class PluginReport:
    plugin: str
    reports: list[BackendReport]
    error: str = ""

    @property
    def ok(self) -> bool:
        """Every available backend conforms, and at least one was actually checked."""
        checked = [r for r in self.reports if not r.unavailable]
        return not self.error and bool(checked) and all(r.ok for r in self.reports)

    def format(self, verbose: bool = False) -> str:
        if self.error:
            return f"plugin {self.plugin}: {self.error}"
        return "\n".join(r.format(verbose) for r in self.reports)


def _fresh_seed() -> int:
    env = os.environ.get("TOKENSPEED_CHECK_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)


def poison_(t: torch.Tensor) -> None:
    """Fill an output with values no correct kernel leaves behind."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(INT_POISON)


def compare_default(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> str | None:
    """Elementwise |out - ref| <= atol + rtol * |ref|; NaN or poison never passes."""
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return None
    if not out.is_floating_point():
        bad = out != ref
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{name}: {int(bad.sum())}/{out.numel()} elements differ; first at {idx}: "
                    f"{int(out[idx])} vs reference {int(ref[idx])}")
        return None
    o, r = out.double(), ref.double()
    finite_ref = torch.isfinite(r)
    nonfinite = ~torch.isfinite(o) & finite_ref
    if bool(nonfinite.any()):
        idx = tuple(int(i) for i in nonfinite.nonzero()[0])
        return (f"{name}: {int(nonfinite.sum())}/{o.numel()} elements are NaN/inf (unwritten or "
                f"overflowed); first at {idx}")
    err = (o - r).abs().where(finite_ref, torch.zeros_like(o))
    bad = err > atol + rtol * r.abs()
    mismatched_inf = ~finite_ref & (o != r)
    bad |= mismatched_inf
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return (f"{name}: {int(bad.sum())}/{o.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
                f"max abs err {float(err.max()):.3g}; first at {idx}: {float(o[idx]):.6g} vs "
                f"reference {float(r[idx]):.6g}")
    return None


def reference_outputs(spec: OpSpec, call: BoundCall,
                      initial: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Run the op's reference in float64 on CPU over the same inputs (and in-out contents)."""
    initial = initial or {}
    ref_in = {r.name: upcast(call.tensors[r.name]) for r in spec.inputs}
    ref_out = {}
    for r in spec.outputs:
        t = call.tensors[r.name]
        if t is None:  # an optional output that does not exist for this call
            ref_out[r.name] = None
            continue
        if r.inout:  # starts from the same prior contents the kernel saw
            ref_out[r.name] = upcast(initial[r.name])
            continue
        ref_out[r.name] = torch.empty(t.shape, dtype=torch.float64 if t.is_floating_point() else t.dtype)
    spec.reference(**ref_in, **ref_out, **call.params)
    return ref_out


def run_case(spec: OpSpec, impl: KernelImpl, case: dict, device: torch.device | str,
             seed: int | None = None) -> CaseResult:
    device = torch.device(device)
    seed = _fresh_seed() if seed is None else seed
    label = spec.label(case)
    res = CaseResult(spec.name, impl.backend, label, "pass", seed=seed)
    try:
        gen = torch.Generator().manual_seed(seed)
        args = spec.make_inputs(case, gen, device)
        call = spec.bind(args)
        sig = spec.signature(call, _device.capability(device))
        reason = impl.reject_reason(sig, spec.primary)
        if reason:
            res.status, res.detail = "skip", reason
            return res
        initial = {r.name: call.tensors[r.name].detach().to("cpu", copy=True)
                   for r in spec.outputs if r.inout}
        for r in spec.outputs:
            if not r.inout and call.tensors[r.name] is not None:
                poison_(call.tensors[r.name])
        before = {r.name: call.tensors[r.name].clone() for r in spec.inputs
                  if call.tensors[r.name] is not None}
        impl.fn(**call.kwargs())
        _device.synchronize(device)
        for name, old in before.items():
            new = call.tensors[name]
            if not torch.equal(old.view(torch.uint8) if old.dtype == torch.float8_e4m3fn else old,
                               new.view(torch.uint8) if new.dtype == torch.float8_e4m3fn else new):
                if not (old.is_floating_point() and torch.equal(old.isnan(), new.isnan())
                        and torch.equal(old.nan_to_num(), new.nan_to_num())):
                    res.status, res.detail = "fail", f"input '{name}' was modified by the kernel"
                    return res
        ref = reference_outputs(spec, call, initial)
        atol, rtol = spec.tolerance(call.tensors[spec.primary].dtype)
        problems = []
        for r in spec.outputs:
            if call.tensors[r.name] is None:
                continue
            out = call.tensors[r.name].detach().to("cpu")
            if spec.compare is not None:
                msg = spec.compare(r.name, out, ref[r.name], call)
            else:
                msg = compare_default(r.name, out, ref[r.name], atol, rtol)
            if msg:
                problems.append(msg)
        if problems:
            res.status, res.detail = "fail", "; ".join(problems)
    except Exception as exc:  # a crashing kernel is a finding, not the end of the run
        res.status = "error"
        res.detail = f"{type(exc).__name__}: {exc}".strip()
        if os.environ.get("TOKENSPEED_CHECK_TRACEBACK"):
            res.detail += "\n" + traceback.format_exc()
    return res


def run_bad_inputs(spec: OpSpec, impl: KernelImpl, registry: Registry, device: torch.device,
                   case: dict, seed: int) -> list[CaseResult]:
    """Malformed calls routed to this backend must raise ArgumentError naming the argument."""
    results = []
    gen = torch.Generator().manual_seed(seed)
    args = spec.make_inputs(case, gen, device)
    for label, bad_args, arg in bad_input_variants(spec, args):
        res = CaseResult(spec.name, impl.backend, f"bad input: {label}", "pass", seed=seed)
        try:
            with use_backend(**{spec.name: impl.backend}):
                registry.call(spec.name, **bad_args)
            res.status, res.detail = "fail", "accepted without an error"
        except ArgumentError as exc:
            if f"'{arg}'" not in str(exc):
                res.status, res.detail = "fail", f"error does not name '{arg}': {exc}"
        except KernelSelectionError as exc:
            res.status, res.detail = "fail", f"reached kernel selection instead of validation: {exc}"
        except Exception as exc:
            res.status, res.detail = "fail", f"raised {type(exc).__name__} instead of ArgumentError: {exc}"
        results.append(res)
    return results


def conformance_cases(op: str, size: str = "small", registry: Registry | None = None) -> list[dict]:
    from .. import get_registry

    return list((registry or get_registry()).spec(op).grid(size))


def check_impl(impl: KernelImpl, *, size: str = "small", device: torch.device | str | None = None,
               seed: int | None = None, registry: Registry | None = None,
               cases: Iterable[dict] | None = None, bad_inputs: bool = True) -> BackendReport:
    from .. import get_registry

    registry = registry or get_registry()
    spec = registry.spec(impl.op)
    device = torch.device(device) if device is not None else _pick_device(impl)
    report = BackendReport(spec.name, impl.backend, impl.plugin, str(device))
    base = _fresh_seed() if seed is None else seed
    first_supported = None
    for i, case in enumerate(spec.grid(size) if cases is None else cases):
        r = run_case(spec, impl, case, device, seed=base + i)
        report.results.append(r)
        if first_supported is None and r.status != "skip":
            first_supported = case
    if bad_inputs and first_supported is not None:
        report.results += run_bad_inputs(spec, impl, registry, device, first_supported, base)
    return report


def _pick_device(impl: KernelImpl) -> torch.device:
    if "cuda" in impl.devices and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def check_backend(op: str, backend: str, **kwargs: Any) -> BackendReport:
    from .. import get_registry

    registry = kwargs.get("registry") or get_registry()
    return check_impl(registry.backend(op, backend), **{**kwargs, "registry": registry})


def check_plugin(plugin: str, *, ops: Iterable[str] | None = None, registry: Registry | None = None,
                 **kwargs: Any) -> PluginReport:
    from .. import get_registry

    registry = registry or get_registry()
    failed = [f for f in registry.failed_plugins if f.name == plugin]
    if failed:
        return PluginReport(plugin, [], f"failed to {failed[0].stage}: {failed[0].error}")
    impls = [i for op in registry.specs for i in registry.implementations(op)
             if i.plugin == plugin and (ops is None or op in ops)]
    if not impls:
        known = sorted({i.plugin for op in registry.specs for i in registry.impls[op]})
        return PluginReport(plugin, [], f"registered no implementation (plugins with kernels: {known})")
    reports = []
    for impl in impls:
        if impl.unavailable:
            reports.append(BackendReport(impl.op, impl.backend, plugin, "-", unavailable=impl.unavailable))
            continue
        reports.append(check_impl(impl, registry=registry, **kwargs))
    return PluginReport(plugin, reports)


def assert_case(op: str, backend: str, case: dict, device: str | torch.device | None = None,
                registry: Registry | None = None, seed: int | None = None) -> None:
    """pytest helper: fail with the kit's message when one grid case does not conform."""
    from .. import get_registry

    registry = registry or get_registry()
    impl = registry.backend(op, backend)
    dev = torch.device(device) if device is not None else _pick_device(impl)
    r = run_case(registry.spec(op), impl, case, dev, seed=seed)
    if r.status in ("fail", "error"):
        raise AssertionError(f"{op}/{backend} {r.label} seed={r.seed}: {r.detail}")
    if r.status == "skip":
        import pytest

        pytest.skip(r.detail)


__all__ = ["BackendReport", "CaseResult", "PluginReport", "assert_case", "check_backend", "check_impl",
           "check_plugin", "conformance_cases", "dtype_name", "run_bad_inputs", "run_case"]
