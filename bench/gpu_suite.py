"""The project's GPU check in one process: ceilings, the conformance kit over every plugin on the
"full" grid, and benchmark presets with every backend side by side, through the same code paths
as `tokenspeed check` / `tokenspeed bench`.

    PYTHONUNBUFFERED=1 python bench/gpu_suite.py --out $OUT --plugins triton \
        --bench "sample:large;mla_decode:memory,latency" [--graph]

Works without installing the project (the device machine may lack cffi): the plugins are
registered by hand instead of through entry points. Writes suite.json and check-<plugin>.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src"),
          os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import tokenspeed_core  # noqa: E402
from tokenspeed_core.bench import get_ceilings, run_bench  # noqa: E402
from tokenspeed_core.testing import check_plugin  # noqa: E402

T0 = time.time()
PLUGIN_MODULES = {"triton": "tokenspeed_kernels_triton.plugin", "cute": "tokenspeed_kernels_blackwell.plugin"}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build_registry(plugins: list[str]):
    import importlib

    reg = tokenspeed_core.build_registry(entry_points=False)
    for name in plugins:
        try:
            mod = importlib.import_module(PLUGIN_MODULES[name])
            with reg.registering_as(name):
                mod.tokenspeed_register_kernels(registry=reg)
            reg.plugins.append(name)
        except Exception:
            log(f"plugin {name} failed to register:\n{traceback.format_exc()}")
    return reg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plugins", default="triton,cute")
    ap.add_argument("--check", default="full", help="grid size, or 'none'")
    ap.add_argument("--check-plugins", default=None, help="plugins to check (default: --plugins)")
    ap.add_argument("--bench", default="", help="op:preset,preset;op:preset ...")
    ap.add_argument("--graph", action="store_true")
    ap.add_argument("--backends", default=None, help="benchmark only these backends (default: all that fit)")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    plugins = [p for p in args.plugins.split(",") if p]
    reg = build_registry(plugins)
    log(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | plugins {reg.plugins}")
    ceil = get_ceilings(device, remeasure=True)
    log(f"ceilings: copy {ceil.copy_gbps} GB/s, bf16 GEMM {ceil.gemm_tflops} TFLOP/s")
    result: dict = {"device": torch.cuda.get_device_name(), "ceilings": dataclasses.asdict(ceil), "checks": {},
                    "bench": []}
    summary = []
    if args.check != "none":
        for plugin in (args.check_plugins or args.plugins).split(","):
            t = time.time()
            rep = check_plugin(plugin, registry=reg, size=args.check, device=device)
            text = rep.format(verbose=True)
            with open(os.path.join(args.out, f"check-{plugin}.txt"), "w") as f:
                f.write(text + "\n")
            for r in rep.reports:
                c = r.counts()
                summary.append(f"check {plugin:7s} {r.op:15s} {'PASS' if r.ok else 'FAIL'} {c}")
                result["checks"][f"{plugin}/{r.op}"] = {"ok": r.ok, "counts": c}
            log(f"check {plugin}: {'PASS' if rep.ok else 'FAIL'} in {time.time() - t:.0f}s\n{rep.format()}")
    for item in filter(None, args.bench.split(";")):
        op, presets = item.split(":")
        spec = reg.spec(op)
        for preset in presets.split(","):
            t = time.time()
            rows = run_bench(op, spec.presets[preset], registry=reg, device=device, ceilings=ceil,
                             iters=args.iters, cuda_graph=args.graph,
                             backends=args.backends.split(",") if args.backends else None)
            for r in rows:
                result["bench"].append({**dataclasses.asdict(r), "preset": preset})
            log(f"bench {op}:{preset} {len(rows)} rows in {time.time() - t:.0f}s")
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(summary))
    print(f"{'op':12s} {'backend':8s} {'case':46s} {'us':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%copy':>6s} {'%gemm':>6s}")
    for r in result["bench"]:
        if r["error"]:
            print(f"{r['op']:12s} {r['backend']:8s} {r['case'][:46]:46s} {r['error'][:40]}")
        else:
            print(f"{r['op']:12s} {r['backend']:8s} {r['case'][:46]:46s} {r['median_us']:9.1f} {r['tflops']:8.1f} "
                  f"{r['gbps']:7.0f} {r['pct_copy']:6.1f} {r['pct_gemm']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
