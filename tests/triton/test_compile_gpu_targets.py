"""Every Triton kernel compiles for Hopper (sm_90) and Blackwell (sm_100), without a GPU.

Table-driven: each kernel module of ``tokenspeed_kernels_triton`` (``plugin.KERNEL_MODULES``) that
defines ``compile_targets()`` is compiled here. ``compile_targets()`` returns a list of

    (jit_fn, signature, constexprs)            or
    (jit_fn, signature, constexprs, options)

where ``signature`` maps every argument of ``jit_fn``, in order, to a Triton type ("*bf16",
"i32", "fp32", ... or "constexpr"), ``constexprs`` gives the constexpr values, and ``options``
may set ``num_warps`` / ``num_stages`` / ``maxnreg`` (the launch config the module really uses)
and ``divisible``: integer arguments compiled as multiples of 16, as the JIT specialises such
values (strides, model dims). Pointer arguments are compiled as 16-byte aligned, as the JIT does
for torch tensors, so the code checked is the code that runs (vector loads, async copies).

A process that imported triton under ``TRITON_INTERPRET=1`` (CI: see conftest.py) holds
interpreter versions of triton's own library functions and cannot compile, so the compiles run
in one child process without that variable (this file run as a script), spread over the CPUs;
each test case reads its result.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

PACKAGE = "tokenspeed_kernels_triton"
ARCHS = (90, 100)


def _targets() -> list[tuple[str, str, int, int, tuple]]:
    """(id, module, index, arch, entry) for every compile target, in a fixed order."""
    plugin = importlib.import_module(f"{PACKAGE}.plugin")
    out = []
    for name in plugin.KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{PACKAGE}.{name}":
                continue  # kernel module not written yet
            raise
        if not hasattr(mod, "compile_targets"):
            continue
        for i, entry in enumerate(mod.compile_targets()):
            for arch in ARCHS:
                out.append((f"{name}-{entry[0].__name__}-{i}-sm{arch}", name, i, arch, tuple(entry)))
    return out


def _compile(job: tuple[str, str, int, int]) -> tuple[str, str]:
    """Compile one target (child process, no interpreter); returns (id, "ok" or the error)."""
    tid, name, index, arch = job
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        entry = importlib.import_module(f"{PACKAGE}.{name}").compile_targets()[index]
        fn, sig, constexprs = entry[:3]
        options = dict(entry[3]) if len(entry) > 3 else {}
        divisible = set(options.get("divisible", ()))
        aligned = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
                   if ty.startswith("*") or name in divisible}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
        opts = {"num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3)}
        if options.get("maxnreg"):  # a register cap the module launches with (more programs per SM)
            opts["maxnreg"] = options["maxnreg"]
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        return tid, "ok" if kernel.asm.get("cubin") else "no cubin produced"
    except Exception as exc:
        return tid, f"{type(exc).__name__}: {exc}"[-2000:]


def _compile_all() -> dict[str, str]:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [t[:4] for t in _targets()]
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(pool.map(_compile, jobs))


if __name__ == "__main__":  # the child process
    print(json.dumps(_compile_all()))
    sys.exit(0)

triton = pytest.importorskip("triton")
TARGETS = _targets()


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tid, entry", [pytest.param(t[0], t[4], id=t[0]) for t in TARGETS])
def test_compiles_for_gpu_target(tid, entry, compiled):
    fn, sig, constexprs = entry[:3]
    assert list(sig) == list(fn.arg_names), "signature must name every argument, in order"
    assert {k for k, v in sig.items() if v == "constexpr"} == set(constexprs)
    assert tid in compiled, f"{tid} was not compiled (child process listed other targets)"
    assert compiled[tid] == "ok", compiled[tid]
