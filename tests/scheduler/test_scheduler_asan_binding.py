"""The cffi extension itself built with ASan + UBSan, driven from Python through the real wrapper:
random workloads plus every error path, so nothing crossing the C ABI is undefined behaviour."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not found")

DRIVER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("tokenspeed._scheduler_cffi", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["tokenspeed._scheduler_cffi"] = module  # the wrapper now binds the ASan build
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    import tokenspeed.scheduler as ts
    from scheduler_driver import WorkloadDriver
    assert ts._scheduler.lib is module.lib
    for k in (0, 2):
        d = WorkloadDriver(ts.Scheduler(page_size=4, num_pages=40, max_batch_tokens=24, max_batch_size=4,
                                        num_draft_slots=k), seed=k)
        d.run(4000, check_every=50)
        d.drain()
    s = ts.Scheduler(page_size=4, num_pages=8, max_batch_tokens=16, max_batch_size=2)
    bad = [lambda: s.abort(7), lambda: s.submit([1, -1], 1), lambda: s.submit([1] * 100, 1),
           lambda: s.submit([], 1), lambda: ts.Scheduler(page_size=64, num_pages=2**30)]
    rid = s.submit([1, 2, 3], 2)
    plan = s.step()
    bad += [lambda: s.step(), lambda: s.commit(plan, [1, 2]), lambda: s.commit(plan, [1], num_sampled=[3])]
    for f in bad:
        try:
            f()
            raise SystemExit("no error raised")
        except ts.SchedulerError:
            pass
    s.commit(plan, [1])
    try:
        s.commit(plan, [1])
        raise SystemExit("double commit accepted")
    except ts.ProtocolError:
        pass
    print("asan binding run ok")
""")


def test_extension_under_asan_ubsan(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scheduler"))
    try:
        import build_cffi
    finally:
        sys.path.pop(0)
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    builder = build_cffi.make_builder(extra_compile_args=flags, extra_link_args=["-fsanitize=address,undefined"],
                                      absolute_paths=True)
    so = builder.compile(tmpdir=str(tmp_path))
    # Python is not a C++ program: preload libstdc++ with the ASan runtime, or ASan's __cxa_throw
    # interceptor finds no real __cxa_throw when the scheduler throws (and reports a CHECK failure).
    preload = [subprocess.run([CXX, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(p) for p in preload):
        pytest.skip("libasan.so or libstdc++.so not found")
    env = {**os.environ, "LD_PRELOAD": ":".join(preload), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, so, str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "asan binding run ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
