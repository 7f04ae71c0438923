"""Triton ``sample`` on the GPU in one process: copy/GEMM ceilings, the conformance kit on the
"full" grid, then timings (CUDA events, L2 flushed, inputs rotated) of the registered kernel, the
torch reference, tile variants of the kernel and, when present, an older kernel kept for
comparison as ``bench/_sample_v1.py`` (same ``sample`` signature; not part of the repository).

    PYTHONUNBUFFERED=1 python bench/gpu_sample.py --out $OUT [--no-check]

Registers the Triton plugin by hand (the device machine may lack cffi for an editable install).
Writes check-sample.txt and sample.json under --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import tokenspeed_core  # noqa: E402
from tokenspeed_core.bench import get_ceilings, run_bench  # noqa: E402
from tokenspeed_core.bench._timing import time_calls  # noqa: E402
from tokenspeed_core.testing import check_backend  # noqa: E402

T0 = time.time()
VARIANTS = [(1024, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 16)]  # (BLOCK, num_warps)
ROTATE = 4  # input sets per case: 4 x 66 MB > the 50 MB L2


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build_registry():
    reg = tokenspeed_core.build_registry(entry_points=False)
    from tokenspeed_kernels_triton import plugin

    with reg.registering_as("triton"):
        plugin.tokenspeed_register_kernels(registry=reg)
    return reg


def load_v1():
    path = os.path.join(ROOT, "bench", "_sample_v1.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_sample_v1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, small preset: tests the script")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    reg = build_registry()
    spec = reg.spec("sample")
    from tokenspeed_kernels_triton import sample as kernel

    v1 = load_v1()
    name = "cpu" if args.smoke else torch.cuda.get_device_name()
    log(f"device {name} | torch {torch.__version__} | v1 kernel {v1 is not None}")
    ceil = get_ceilings(device, remeasure=True)
    log(f"ceilings: copy {ceil.copy_gbps} GB/s, bf16 GEMM {ceil.gemm_tflops} TFLOP/s")
    result: dict = {"device": name, "ceilings": dataclasses.asdict(ceil)}
    summary = []
    if not args.no_check:
        rep = check_backend("sample", "triton", size="full", device=device, registry=reg)
        with open(os.path.join(args.out, "check-sample.txt"), "w") as f:
            f.write(rep.format(verbose=True) + "\n")
        result["check"] = {"ok": rep.ok, "counts": rep.counts()}
        summary.append(f"check triton sample full grid: {'PASS' if rep.ok else 'FAIL'} {rep.counts()}")
        log(summary[-1] + "\n" + rep.format())

    cases = list(spec.presets["large"]) + [dict(B=1, V=129280, dtype=torch.bfloat16, mode="plain"),
                                           dict(B=1, V=129280, dtype=torch.bfloat16)]
    if args.smoke:
        cases = list(spec.presets["small"])
    rows = run_bench("sample", cases, registry=reg, device=device, ceilings=ceil, iters=args.iters)
    rows += [] if args.smoke else run_bench("sample", cases, registry=reg, device=device, ceilings=ceil, iters=args.iters,
                      backends=["triton"], cuda_graph=True)  # capturable: no host sync
    table = [(r.backend + ("/graph" if r.method == "cuda-graph" else ""), r.case, r.median_us,
              r.pct_copy, r.error) for r in rows]
    # kernel variants and the old kernel on the same inputs, each checked against the reference
    pct = {}
    for r in rows:
        pct[r.case] = (r.pct_copy / 100.0) * r.median_us  # copy-floor time in us for the case
    for case in cases:
        label = spec.label(case)
        sets = [spec.bind(spec.make_inputs(case, torch.Generator().manual_seed(s), device))
                for s in range(ROTATE)]
        ref = torch.empty_like(sets[0].tensors["out"])
        spec.reference(**{k: v for k, v in sets[0].kwargs().items() if k != "out"}, out=ref)
        impls = [(f"triton b{b} w{w}", lambda b=b, w=w, **kw: kernel.launch(**kw, block=b, num_warps=w))
                 for b, w in VARIANTS]
        if v1 is not None:
            impls.append(("triton-v1", v1.sample))
        for impl_name, fn in impls:
            try:
                out = sets[0].tensors["out"].fill_(-7)
                fn(**sets[0].kwargs())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                verdict = spec.compare("out", out.clone(), ref, sets[0])
                t = time_calls([(lambda c=c: fn(**c.kwargs())) for c in sets], device, iters=args.iters)
                table.append((impl_name, label, t.median_us, 100.0 * pct.get(label, float("nan")) / t.median_us,
                              "" if verdict is None else f"MISMATCH {verdict[:60]}"))
            except Exception as exc:  # a failing variant is a row, not the end of the run
                table.append((impl_name, label, float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:80]))
        log(f"variants done: {label}")
    result["rows"] = [dict(zip(("backend", "case", "median_us", "pct_copy", "note"), r)) for r in table]
    with open(os.path.join(args.out, "sample.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(summary))
    print(f"copy ceiling {ceil.copy_gbps:.0f} GB/s on {name}")
    print(f"{'backend':18s} {'case':44s} {'us':>9s} {'%copy':>6s} note")
    for name, label, us, pc, note in table:
        print(f"{name:18s} {label[:44]:44s} {us:9.1f} {pc:6.1f} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
