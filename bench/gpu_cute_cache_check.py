"""Device check of the CuTe compile cache (tokenspeed_kernels_blackwell._compile_cache), ~40 s:

    source .device/setup.sh && PYTHONUNBUFFERED=1 python3 bench/gpu_cute_cache_check.py --out $OUT

On a Hopper GPU (the v3 kernel is sm_90a only), one shape class (v3, bf16, H 16, q_len 1, page 64):
1. a subprocess compiles it into a fresh, empty cache folder (``load_or_compile``: compile, export
   the object, reload it) and runs what it got on seeded random inputs;
2. a second subprocess loads it from that folder (a compile there fails the check), compiles a
   fresh kernel too (``mla_decode._compile``, no cache), runs both through ``mla_decode`` on the
   same inputs and requires the outputs (out and lse) to be equal bit for bit to each other and
   to the first process's, and within the op's bf16 tolerance of the float64 reference; then
   captures the loaded kernel in a CUDA graph and requires the replay to equal eager, bit for bit.
   Where ``compile_kernel`` is wired to the cache it also checks that ``compile_kernel`` loads.
Reports compile time against load time, and the host time per eager call (loaded vs fresh).
Runs from the checkout, nothing installed: the children get the repository root and both kernel
packages' src folders on PYTHONPATH. Details go to $OUT/cute_cache_check.json; a table is
printed last. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = [ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src"),
       os.path.join(ROOT, "tokenspeed_kernels_blackwell", "src")]
for p in SRC:
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

ARCH, VARIANT = "sm_90a", "v3"
H, Q_LEN, D, DV, PAGE = 16, 1, 576, 512, 64
SHAPE = (torch.bfloat16, H, Q_LEN, D, DV, PAGE)  # the order compile_kernel keys its shape class by
# (name, per-request lengths): lengths 1, page-1, page, page+1, a non-multiple; one long request
# (many KV splits, the combine kernel's loop); a wide batch
CASES = [("b6 awkward", [1, 63, 64, 65, 1000, 4097]), ("b1 16K", [16384]), ("b32 4K", [4096] * 32)]
DEVICE = "cuda"  # a CPU dry run of the plumbing sets this to "cpu"
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# -- child processes -------------------------------------------------------------------------------
def make_inputs(lengths, seed):
    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(seed)
    b, width = len(lengths), -(-max(lengths) // PAGE)
    num_pages = b * width + 1
    return dict(
        q=torch.randn((b, Q_LEN, H, D), generator=g, device=dev).to(torch.bfloat16),
        kv_cache=torch.randn((num_pages, PAGE, D), generator=g, device=dev).to(torch.bfloat16),
        page_table=torch.randperm(num_pages, generator=g, device=dev)[: b * width].view(b, width).to(torch.int32),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=dev),
        out=torch.full((b, Q_LEN, H, DV), float("nan"), device=dev, dtype=torch.bfloat16),
        lse=torch.full((b, Q_LEN, H), float("nan"), device=dev, dtype=torch.float32),
        softmax_scale=1.0 / math.sqrt(192), head_dim_v=DV, kv_scale=1.0,
    )


def run_with(cm, fn, a):
    """out, lse of cm.mla_decode launching ``fn`` (the launcher's own code: splits, buffers)."""
    real = cm.compile_kernel
    cm.compile_kernel = lambda *args, **kw: fn
    cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
    try:
        a["out"].fill_(float("nan"))
        a["lse"].fill_(float("nan"))
        cm.mla_decode(**a, variant=VARIANT)
        torch.cuda.synchronize()
    finally:
        cm.compile_kernel = real
        cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
    return a["out"].clone(), a["lse"].clone()


def bits_equal(x, y):
    """Equal bit for bit (NaN == NaN of the same payload)."""
    view = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[x.dtype]
    return bool(torch.equal(x.view(view), y.view(view)))


def within_reference(a, out, lse):
    from tokenspeed_core.ops.mla_decode import reference

    r64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in a.items()}
    reference(**r64)
    atol, rtol = 1e-2, 2e-2  # tokenspeed_core.ops._common.ATTENTION_TOL[bf16]
    err = {}
    for name, got, ref in (("out", out, r64["out"]), ("lse", lse, r64["lse"])):
        diff = (got.double() - ref).abs()
        ok = bool(torch.isfinite(got).all()) and bool((diff <= atol + rtol * ref.abs()).all())
        err[name] = (ok, float(diff.max()))
    return err


def child(mode, cache_dir):
    t0 = time.perf_counter()
    import cutlass.cute  # noqa: F401  (both paths need it; not part of either timing)

    from tokenspeed_kernels_blackwell import _compile_cache as cc
    from tokenspeed_kernels_blackwell import mla_decode as cm

    torch.zeros(1, device=DEVICE)  # CUDA context first, as in mla_decode (capability query)
    res = dict(mode=mode, import_s=round(time.perf_counter() - t0, 2), checks={})
    key = cc.make_key(ARCH, VARIANT, SHAPE)
    res["key"] = key.digest
    compile_s = []

    def compile_v3():
        t = time.perf_counter()
        args = [ARCH, torch.bfloat16, H, Q_LEN, D, DV, PAGE, VARIANT]
        if "kv_dtype" in inspect.signature(cm._compile).parameters:  # since the fp8 cache
            args.append(torch.bfloat16)
        fn = cm._compile(*args)
        compile_s.append(time.perf_counter() - t)
        return fn

    t = time.perf_counter()
    fn = cc.load_or_compile(key, compile_v3)
    res["load_or_compile_s"] = round(time.perf_counter() - t, 3)
    res["stats"] = dict(cc.stats.__dict__)
    res["files"] = sorted(os.listdir(cc.cache_dir()))
    saved = os.path.join(cache_dir, "outputs-first-process.pt")
    if hasattr(cm, "_compile_cache"):  # compile_kernel wired to the disk cache: its own key
        cm._compiled.clear()
        before = dict(cc.stats.__dict__)
        cm.compile_kernel(ARCH, torch.bfloat16, H, Q_LEN, PAGE, variant=VARIANT)
        if mode == "load":
            res["checks"]["compile_kernel loads from disk"] = (
                cc.stats.loads == before["loads"] + 1 and cc.stats.compiles == before["compiles"])
    else:
        res["compile_kernel"] = "not wired to the disk cache (mla_decode has no _compile_cache)"
    if mode == "compile":
        res["compile_s"] = round(compile_s[0], 3)
        st = res["stats"]  # before compile_kernel ran
        res["checks"]["compiled and stored"] = st["compiles"] == 1 and st["stores"] == 1
        outs = {}
        for i, (name, lengths) in enumerate(CASES):
            outs[name] = run_with(cm, fn, make_inputs(lengths, seed=i))
        torch.save({k: (o.cpu(), s.cpu()) for k, (o, s) in outs.items()}, saved)
        return res

    res["load_s"] = res["load_or_compile_s"]
    st = res["stats"]
    res["checks"]["loaded from disk, no compile"] = st["loads"] == 1 and st["compiles"] == 0
    fresh = compile_v3()
    res["fresh_compile_s"] = round(compile_s[-1], 3)
    first = torch.load(saved)
    for i, (name, lengths) in enumerate(CASES):
        a = make_inputs(lengths, seed=i)
        out_l, lse_l = run_with(cm, fn, a)
        out_f, lse_f = run_with(cm, fresh, a)
        res["checks"][f"{name}: loaded == fresh (bits)"] = bits_equal(out_l, out_f) and bits_equal(lse_l, lse_f)
        o1, l1 = first[name]
        res["checks"][f"{name}: == first process (bits)"] = (bits_equal(out_l.cpu(), o1)
                                                             and bits_equal(lse_l.cpu(), l1))
        err = within_reference(a, out_l, lse_l)
        res["checks"][f"{name}: within bf16 tol of float64 reference"] = err["out"][0] and err["lse"][0]
        res[f"{name} max_err"] = dict(out=err["out"][1], lse=err["lse"][1])
        del a
    # CUDA graph: capture the loaded kernel, replay on new q, compare with eager
    a = make_inputs(CASES[0][1], seed=100)
    real = cm.compile_kernel
    cm.compile_kernel = lambda *args, **kw: fn
    cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
    try:
        cm.mla_decode(**a, variant=VARIANT)  # warm-up outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            cm.mla_decode(**a, variant=VARIANT)
        a["q"].copy_(torch.randn_like(a["q"]))
        a["out"].fill_(float("nan"))
        a["lse"].fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        out_g, lse_g = a["out"].clone(), a["lse"].clone()
    finally:
        cm.compile_kernel = real
        cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
    out_e, lse_e = run_with(cm, fn, a)
    res["checks"]["graph replay == eager (bits)"] = bits_equal(out_g, out_e) and bits_equal(lse_g, lse_e)
    # host time per eager call, loaded vs fresh (both TVM-FFI launches)
    for name, f in (("loaded", fn), ("fresh", fresh)):
        cm.compile_kernel = lambda *args, _f=f, **kw: _f
        cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
        try:
            for _ in range(20):
                cm.mla_decode(**a, variant=VARIANT)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                cm.mla_decode(**a, variant=VARIANT)
            host = (time.perf_counter() - t) / 200
            torch.cuda.synchronize()
        finally:
            cm.compile_kernel = real
            cm._launch_plan.cache_clear()  # plans hold the kernel they were made with
        res[f"host_us_per_call_{name}"] = round(host * 1e6, 1)
    return res


# -- parent --------------------------------------------------------------------------------------
def run_child(mode, cache_dir):
    env = dict(os.environ, TOKENSPEED_CACHE_DIR=cache_dir, CUTE_DSL_ARCH=ARCH, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(SRC + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for k in ("TOKENSPEED_CUTE_CACHE", "CUTE_DSL_KEEP", "CUTE_DSL_KEEP_PTX", "CUTE_DSL_KEEP_CUBIN",
              "CUTE_DSL_KEEP_SASS", "CUTE_DSL_KEEP_IR"):
        env.pop(k, None)
    t = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--cache", cache_dir],
                          env=env, capture_output=True, text=True, timeout=400)
    wall = round(time.time() - t, 1)
    if proc.returncode != 0:
        log(f"child {mode} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return dict(mode=mode, error=proc.stderr[-6000:], wall_s=wall, checks={f"child {mode} ran": False})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    res["stderr_tail"] = proc.stderr[-2000:]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", choices=("compile", "load"))
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache)))
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        log("needs a Hopper GPU (the v3 kernel is sm_90a only)")
        return 1
    card = torch.cuda.get_device_name(0)
    log(f"{card}; shape class {VARIANT} {ARCH} bf16 H{H} q_len {Q_LEN} page {PAGE}")
    cache_dir = tempfile.mkdtemp(prefix="ts-cute-cache-")
    try:
        first = run_child("compile", cache_dir)
        log(f"compile child: {json.dumps({k: v for k, v in first.items() if k != 'stderr_tail'})}")
        second = run_child("load", cache_dir) if "error" not in first else dict(checks={})
        log(f"load child: {json.dumps({k: v for k, v in second.items() if k != 'stderr_tail'})}")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cute_cache_check.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, first=first, second=second), f, indent=1)
    checks = {**first.get("checks", {}), **second.get("checks", {})}
    ok = bool(checks) and all(checks.values()) and "error" not in second
    print(f"\n{card}: CuTe compile cache, {VARIANT} {ARCH} bf16 H{H} q_len {Q_LEN} page {PAGE}")
    print("| check | result |\n|---|---|")
    for name, passed in checks.items():
        print(f"| {name} | {'pass' if passed else 'FAIL'} |")
    print("\n| step | seconds |\n|---|---|")
    for label, v in (("import DSL + package (compile child)", first.get("import_s")),
                     ("compile (cute.compile)", first.get("compile_s")),
                     ("compile + export + reload (first process)", first.get("load_or_compile_s")),
                     ("load from disk (second process)", second.get("load_s")),
                     ("fresh compile (second process, DSL warm)", second.get("fresh_compile_s"))):
        print(f"| {label} | {v} |")
    print(f"\nhost us per eager mla_decode call: loaded {second.get('host_us_per_call_loaded')}, "
          f"fresh {second.get('host_us_per_call_fresh')}; {second.get('compile_kernel', '')}")
    print("ALL PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
