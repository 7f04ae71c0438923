"""Host time of one eager mla_decode call through each layer of the op API (CPU or GPU):

    python bench/host_overhead.py                         # CPU: reference (+ triton interpreter)
    PYTHONUNBUFFERED=1 python bench/host_overhead.py --out $OUT      # GPU: every backend that runs

For each backend, at a tiny shape (B 1, q_len 1, H 16, 64 cached tokens: the kernel's own work is
a few µs, so back-to-back calls measure the host):

- ``registry.call``: bind + validate, signature, cached selection, kernel;
- ``plan.run``: the guard check, kernel (``Registry.plan`` made once beforehand);
- ``impl.fn``: the selected kernel function with prepared keyword arguments (the floor).

Outputs are passed in all three (as a graph-free engine would), so they do the same work; one more
row allocates them per run. The ``noop`` backend is a kernel that does nothing, registered here:
its rows are the op API's own cost. Each number is the median over ``--repeats`` rounds, a round
timing one batch of back-to-back calls of each layer in turn (µs per call); on a GPU each batch
ends with a synchronize. The table names the machine; details go to ``$OUT/host_overhead.json``
when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src"),
           os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tokenspeed_core  # noqa: E402
from tokenspeed_core import Priority, use_backend  # noqa: E402
from tokenspeed_core.ops import mla_decode as mla  # noqa: E402

OP = "mla_decode"


def build_registry():
    """Installed plugins by entry point; the in-tree ones by hand when they are not installed."""
    reg = tokenspeed_core.build_registry()
    for name, module in (("triton", "tokenspeed_kernels_triton.plugin"),
                         ("cute", "tokenspeed_kernels_blackwell.plugin")):
        if name in reg.plugins:
            continue
        try:
            plugin = __import__(module, fromlist=["tokenspeed_register_kernels"])
            with reg.registering_as(name):
                plugin.tokenspeed_register_kernels(registry=reg)
        except Exception as exc:  # a missing package just drops its backend from the table
            print(f"plugin {name} not loaded: {exc!r}", flush=True)
    with reg.registering_as("bench"):
        reg.register(OP, lambda **kwargs: None, backend="noop", priority=Priority.REFERENCE - 100,
                     doc="does nothing: measures the op API alone")
    return reg


def tiny_inputs(device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = dict(B=1, q_len=1, H=16, page_size=64, seqlens=[64], dtype=dtype)
    args = mla.SPEC.make_inputs(case, torch.Generator().manual_seed(0), device)
    args["out"] = torch.empty((1, 1, 16, 512), dtype=dtype, device=device)
    args["lse"] = torch.empty((1, 1, 16), dtype=torch.float32, device=device)
    return args


def per_call_us(fns: dict, device: torch.device, repeats: int, min_batch_s: float) -> dict:
    """µs per call of each of ``fns``: the median over ``repeats`` rounds, each round timing one
    batch of back-to-back calls of every fn in turn (interleaved, so load drifts hit all alike)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = {}
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        one = max(time.perf_counter() - t, 1e-7)
        batch[name] = max(1, min(5000, int(min_batch_s / one)))
        if one > 0.01:  # a slow kernel (the Triton interpreter): its rows are noise for the host anyway
            repeats = min(repeats, 5)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = batch[name]
            sync()
            t = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t) / k * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def runnable_backends(reg, args) -> list[str]:
    """Every backend that accepts this call, the selected one first, then noop."""
    call = reg.spec(OP).bind(args)
    cands = reg.candidates(reg.signature(call))
    names = [c.impl.backend for c in cands if c.reason is None and c.impl.backend != "noop"]
    return names + ["noop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="", help="comma list (default: every backend that runs, and noop)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-seconds", type=float, default=0.05, help="length of one timed batch")
    ap.add_argument("--out", default=None, help="folder for host_overhead.json")
    opts = ap.parse_args()

    device = torch.device(opts.device)
    reg = build_registry()
    args = tiny_inputs(device)
    backends = [b for b in opts.backends.split(",") if b] or runnable_backends(reg, args)
    bound = reg.spec(OP).bind(args).kwargs()  # every argument, as call() passes them to the kernel
    no_outs = {k: v for k, v in args.items() if k not in ("out", "lse")}

    rows = []
    for backend in backends:
        with use_backend(**{OP: backend}):
            plan = reg.plan(OP, **args)
            plan_alloc = reg.plan(OP, **no_outs)
            fn = plan.impl.fn
            row = {"backend": backend}
            row.update(per_call_us({
                "call": lambda: reg.call(OP, **args),
                "run": lambda p=plan: p.run(**args),
                "run_alloc": lambda p=plan_alloc: p.run(**no_outs),
                "fn": lambda fn=fn: fn(**bound),
                "plan": lambda: reg.plan(OP, **args),
            }, device, opts.repeats, opts.batch_seconds))
        rows.append(row)
        print(f"{backend}: done", flush=True)

    name = machine(device)
    meta = {"machine": name, "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "shape": "B 1, q_len 1, H 16, D 576, Dv 512, page 64, 64 tokens, "
                     + ("bf16" if device.type == "cuda" else "fp32"),
            "repeats": opts.repeats, "rows": rows}
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "host_overhead.json"), "w") as f:
            json.dump(meta, f, indent=1)

    print(f"\nhost µs per eager {OP} call on {name}; {meta['shape']}; torch {torch.__version__}; "
          f"median of {opts.repeats} batches (5 where one call takes > 10 ms)")
    print("| backend | registry.call | plan.run | impl.fn | call - fn | run - fn | "
          "plan.run, allocating out+lse | plan() |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['call']:.1f} | {r['run']:.1f} | {r['fn']:.1f} | "
              f"{r['call'] - r['fn']:.1f} | {r['run'] - r['fn']:.1f} | {r['run_alloc']:.1f} | "
              f"{r['plan']:.1f} |")


if __name__ == "__main__":
    main()
