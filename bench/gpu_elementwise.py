"""One GPU call for the Triton elementwise ops: correctness at the "large" presets, timings against
the copy ceiling measured in the same process, then the "full" conformance grids while time lasts.

Run from the repository root (no install needed):
    PYTHONUNBUFFERED=1 PYTHONPATH=.:tokenspeed_kernels_triton/src python3 bench/gpu_elementwise.py
Writes $OUT/elementwise.json (or ./elementwise.json) and prints a table last.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

import tokenspeed_core
from tokenspeed_core.testing import check_backend
from tokenspeed_core.testing._conformance import compare_default

OPS = ("rms_norm", "rope", "silu_and_mul", "kv_cache_write")
START = time.time()
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "150"))


def registry():
    """Reference + these four Triton modules only (other kernel modules may be mid-edit)."""
    import importlib

    from tokenspeed_kernels_triton import plugin

    reg = tokenspeed_core.build_registry(entry_points=False)
    with reg.registering_as("triton"):
        for op in OPS:
            importlib.import_module(f"tokenspeed_kernels_triton.{op}").register(reg, plugin.common())
    return reg


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_ceiling(dev) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (GB/s)."""
    src = torch.randn(2**29, device=dev, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def same_size_copy_gbs(nbytes: int, dev) -> float:
    """A device-to-device copy moving ``nbytes`` (half read, half written): the ceiling of a
    transfer this small, launch and ramp-up included (GB/s)."""
    src = torch.empty(max(1, nbytes // 4), device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def check_large(spec, impl, call) -> str | None:
    """Kernel vs the reference run on the GPU (float32 math) over the same inputs."""
    inout = {"kv_cache"}
    ref = {n: (t.clone() if n in inout else torch.empty_like(t)) for n, t in call.tensors.items()
           if t is not None and n in {r.name for r in spec.outputs}}
    for r in spec.outputs:
        if r.name not in inout and call.tensors.get(r.name) is not None:
            call.tensors[r.name].fill_(float("nan"))
    ins = {r.name: call.tensors[r.name] for r in spec.inputs}
    spec.reference(**ins, **ref, **call.params)
    impl.fn(**call.kwargs())
    if call.device.type == "cuda":
        torch.cuda.synchronize()
    atol, rtol = spec.tolerance(call.tensors[spec.primary].dtype)
    for r in spec.outputs:
        out = call.tensors[r.name]
        if out is None:  # an optional output not asked for (rms_norm without a residual)
            continue
        msg = (spec.compare(r.name, out, ref[r.name].double(), call) if spec.compare
               else compare_default(r.name, out, ref[r.name], atol, rtol))
        if msg:
            return msg
    return None


def in_place_checks(reg, dev) -> list[str]:
    """Aliased outputs on the GPU: fused rms_norm fully in place (both paths), rope in place."""
    problems = []
    g = torch.Generator().manual_seed(5)
    for N in (7168, 65539):
        x = torch.randn(64, N, generator=g).bfloat16().to(dev)
        res = torch.randn(64, N, generator=g).bfloat16().to(dev)
        w = (torch.rand(N, generator=g) + 0.5).bfloat16().to(dev)
        out_ref, res_ref = torch.empty_like(x), torch.empty_like(x)
        reg.spec("rms_norm").reference(x=x, weight=w, residual=res, out=out_ref, residual_out=res_ref)
        reg.backend("rms_norm", "triton").fn(x=x, weight=w, residual=res, out=x, residual_out=res)
        if msg := compare_default(f"rms_norm in place N={N}", x, out_ref, 8e-3, 1.6e-2):
            problems.append(msg)
        if msg := compare_default(f"residual in place N={N}", res, res_ref, 8e-3, 1.6e-2):
            problems.append(msg)
    spec = reg.spec("rope")
    args = spec.make_inputs(dict(T=999, Hq=16, Hk=1, Dr=64, style="gptj", dtype=torch.bfloat16, yarn=True),
                            g, dev)
    q_ref, k_ref = torch.empty_like(args["q"]), torch.empty_like(args["k"])
    spec.reference(**args, q_out=q_ref, k_out=k_ref)
    reg.backend("rope", "triton").fn(**args, q_out=args["q"], k_out=args["k"])
    for n, a, b in (("q", args["q"], q_ref), ("k", args["k"], k_ref)):
        if msg := compare_default(f"rope in place {n}", a, b, 8e-3, 1.6e-2):
            problems.append(msg)
    return problems


def main() -> int:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    reg = registry()
    print(f"card: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    copy_gbs = copy_ceiling(dev)
    print(f"copy ceiling: {copy_gbs:.0f} GB/s (1 GiB device-to-device, read + write)", flush=True)
    rows, failures = [], []
    gen = torch.Generator().manual_seed(1234)
    for op in OPS:
        spec, impl = reg.spec(op), reg.backend(op, "triton")
        for case in spec.presets["large"]:
            label = spec.label(case)
            call = spec.bind(spec.make_inputs(case, gen, dev))
            msg = check_large(spec, impl, call)
            if msg:
                failures.append(f"{op} {label}: {msg}")
            kw = call.kwargs()
            t_tri = median_ms(lambda impl=impl, kw=kw: impl.fn(**kw))
            t_ref = median_ms(lambda spec=spec, kw=kw: spec.reference(**kw))
            cost = spec.cost(call)
            gbs = cost.bytes / t_tri / 1e6
            same = same_size_copy_gbs(cost.bytes, dev)
            rows.append(dict(op=op, shape=label, ok=msg is None, triton_us=t_tri * 1e3, torch_ref_us=t_ref * 1e3,
                             bytes=cost.bytes, gbs=gbs, pct_copy=100 * gbs / copy_gbs, same_size_copy_gbs=same,
                             pct_same_size_copy=100 * gbs / same))
            print(f"  {op:<15} {label:<52} {'ok ' if msg is None else 'BAD'} {t_tri * 1e3:9.1f} us "
                  f"{gbs:7.0f} GB/s {100 * gbs / copy_gbs:5.1f}% copy {100 * gbs / same:5.1f}% same-size copy "
                  f"(torch ref {t_ref * 1e3:9.1f} us)", flush=True)
            del call, kw
            torch.cuda.empty_cache()
    failures += in_place_checks(reg, dev)
    conformance = {}
    for op in OPS:  # the full grids, against float64 CPU references, while the budget lasts
        if time.time() - START > BUDGET_S * 0.6:
            conformance[op] = "not run (time budget)"
            continue
        rep = check_backend(op, "triton", size="full", device="cuda", registry=reg)
        conformance[op] = rep.format()
        print(rep.format(), flush=True)
        if not rep.ok:
            failures.append(rep.format())
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "elementwise.json"), "w") as f:
        json.dump(dict(card=name, copy_gbs=copy_gbs, triton=triton.__version__, torch=torch.__version__,
                       rows=rows, failures=failures, conformance=conformance), f, indent=1)
    print(f"\n{name}, copy ceiling {copy_gbs:.0f} GB/s, {time.time() - START:.0f} s")
    print("| op | shape | MB | Triton us | GB/s | % copy | % same-size copy | torch ref us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['shape']} | {r['bytes'] / 1e6:.1f} | {r['triton_us']:.1f} | {r['gbs']:.0f} | "
              f"{r['pct_copy']:.1f} | {r['pct_same_size_copy']:.1f} | {r['torch_ref_us']:.1f} |")
    print("failures:", failures if failures else "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
