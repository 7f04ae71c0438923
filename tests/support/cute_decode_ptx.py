"""Shared by the CuTe mla_decode compile tests (tests/blackwell): where the package's source is,
the compile script each test runs in a subprocess (with CUTE_DSL_ARCH set: unset, the DSL
silently targets sm_100a), and readers of the PTX it dumps."""

from __future__ import annotations

import os
import textwrap

PKG_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "tokenspeed_kernels_blackwell", "src")


COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch
    from tokenspeed_kernels_blackwell.mla_decode import compile_kernel
    arch = os.environ["CUTE_DSL_ARCH"]
    out = []
    for dtype, h, q, ps, *rest in json.loads(sys.argv[1]):
        t = time.time()
        kv = getattr(torch, rest[1]) if len(rest) > 1 else None
        compile_kernel(arch, getattr(torch, dtype), h, q, ps, variant=rest[0], kv_dtype=kv)
        out.append(round(time.time() - t, 2))
    print(json.dumps(out))
""")


def ptx_entries(text: str):
    """A kernel's PTX entries by role: (split kernel, [combine builds: the batched one (many
    splits), then the row-per-warp ones for up to 8, 4 and 2 splits])."""
    bodies = text.split(".entry ")[1:]
    split = [b for b in bodies if "attention_kernel" in b[:160]]
    batched = [b for b in bodies if "combine_kernel" in b[:160]]
    rows = sorted((b for b in bodies if "combine_rows_kernel" in b[:160]), key=lambda b: -b.count("ld.global"))
    assert len(split) == 1 and len(batched) == 1 and len(rows) == 3, [b[:80] for b in bodies]
    return split[0], batched + rows


def assert_one_split_writes_out(split: str, rows: int = 64, cols: int = 256, lse_stores: int = 4):
    """The epilogue (128 threads, a tile of ``rows`` x ``cols`` of O: v3 / v5 a warpgroup's
    half of Dv, v4 all of it) goes through smem and leaves in 16-byte stores, 512 contiguous
    bytes a warp: with one split a request to out (16-bit, times kv_scale), else to the
    partials (16-bit too). The LSE goes to lse or the partial LSE, one 32-bit store each."""
    assert split.count("st.global.v4.b32") == rows * cols * (2 + 2) // 16 // 128, split.count("st.global.v4.b32")
    assert split.count("ld.shared.v4.b32") >= rows * cols * (2 + 2) // 16 // 128
    assert split.count("st.global.b32") == lse_stores, split.count("st.global.b32")
    assert "st.global.b16" not in split and "st.global.v2" not in split  # nothing stored piecemeal
    assert "%globaltimer" not in split and "%clock" not in split  # no timing probe in a production build
