"""What the tuned Hopper build of the Triton mla_prefill kernel must contain, checked without a GPU.

test_compile_gpu_targets.py proves every compile target builds for sm_90 and sm_100; this checks
the first target (bf16, Dqk 192 / Dv 128, the Hopper tiles) more closely. Runs in a subprocess: the compile needs TRITON_INTERPRET unset, and the test session sets it.
Pointers and strides get the 16-divisibility the runtime launcher infers for aligned tensors, so
the check sees the build a real launch gets (with it, the key/value loads are software-pipelined
through cp.async; the test asserts that, and wgmma on sm_90).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokenspeed_kernels_triton import mla_prefill as kernel

arch = int(sys.argv[1])
results = []
for fn, sig, constexprs, options in kernel.compile_targets()[:1]:
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
               if t.startswith("*") or n.startswith("stride_")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned),
                       target=GPUTarget("cuda", arch, 128), options=options)
    ptx = k.asm["ptx"]
    results.append({"dtype": sig["Q"], "dqk": constexprs["DQK"], "shared": k.metadata.shared,
                    "cp_async": ptx.count("cp.async"), "wgmma": ptx.count("wgmma.mma_async"),
                    "cubin": len(k.asm.get("cubin", b""))})
print(json.dumps(results))
"""


@pytest.mark.parametrize("arch", [90, 100])
def test_compiles_for_gpu_target(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 1
    for r in results:
        assert r["cubin"] > 0, r
        assert r["shared"] <= 227 * 1024, r  # fits one Hopper/Blackwell SM
        if r["dtype"] != "*fp32":
            assert r["cp_async"] > 0, f"key/value loads not pipelined: {r}"
        if arch == 90 and r["dtype"] != "*fp32":
            assert r["wgmma"] > 0, f"no wgmma on sm_90: {r}"
