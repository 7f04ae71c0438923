"""Triton ``sample``: temperature, top-k, top-p, min-p and the seeded exponential race.

Every decision is taken per row on the device (no host sync, graph-capturable). Every filter keeps
an upper set of the logits (q = exp((x - m) / T) is monotone in x), so each is a threshold on the
order-preserving integer key of x (16 bits for bf16, 24 for fp16, 32 for fp32), and the kept set is
the tokens whose key clears all thresholds. The row is streamed in BLOCK chunks:

1. max and first argmax. Rows with no filter (the common agent case) run the race in this same
   pass, before the max is known (see ``_sample_kernels``). Greedy rows stop after this pass.
2. top-k (if on): the k-th largest key, exactly, by a radix select with 8-bit digits, each pass a
   ``tl.histogram`` of the digit under the prefix found so far.
3. top-p (if on): the largest key t whose set {key >= t} (within top-k) holds mass >= top_p * total,
   by a radix search with 4-bit digits (16 candidate masses per pass). It only searches between
   lo = max(top-k key, a key safely below the min-p cut) and the max key: the digits common to
   both are skipped, and once the mass above lo is below the target the search stops.
4. the race over the kept tokens, E from the spec's counter-based hash.

Two paths, chosen from the static shape (B, V) only, so a captured graph never changes path:

* one program per row (``_sample_kernel``) when B > SPLIT_MAX_B (enough rows to fill the GPU);
* split-row for small batches (agents sample B = 1..8 at V ~ 129K): each row is cut into
  ``nsplit`` chunks, one program per (row, chunk), and every pass above is one launch of
  ``_split_step_kernel`` over all (row, chunk) programs. A pass leaves per-chunk partials in a
  small torch-allocated workspace (chunk max/argmax, per-chunk race winners, 16 top-p masses) or
  adds integer histograms atomically (exact, so order-independent); the next pass's programs each
  replay the row's decisions from those partials (a few hundred values), so no pass needs a
  separate reduction launch. ``_split_finish_kernel`` (one program per row) merges the winners.
  Launches per call: a memset (histograms), step 0 (max, plain race, top-k digit 0), the other
  top-k digits, the top-p stages, the race, the finish: 9 for bf16 (12 fp16, 15 fp32), all of them
  every call (no host decision); programs whose row needs no such pass return after 4 scalar loads.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokenspeed_core.ops.sample import LOGIT_DTYPES

from ._sample_kernels import (  # noqa: F401  (_row_key & co. re-exported for tests)
    _exponential,
    _high_mask,
    _load_row,
    _ordered_key,
    _plain_step,
    _race_step,
    _random_bits,
    _row_key,
    _row_params,
    _sample_kernel,
    _top_p_range,
)

BLOCK_MAX = 1024
NUM_WARPS = 8
# split-row path: B <= SPLIT_MAX_B (and more than one block per row); about SPLIT_PROGRAMS programs
# in all. Module-level so tests can force the path and cut rows into small awkward chunks.
SPLIT_MAX_B = 32
SPLIT_PROGRAMS = 256
SPLIT_BLOCK = 1024
SPLIT_WARPS = 8
WSF, WSI, PM = 4, 2, 32  # per-chunk slots: floats, ints, top-p masses (16 + total + mass above lo)


@triton.jit
def _chunk_max(wsf_row, nsplit, NSPLIT_P2: tl.constexpr):
    c = tl.arange(0, NSPLIT_P2)
    return tl.max(tl.load(wsf_row + c * 4, mask=c < nsplit, other=float("-inf")), axis=0)


@triton.jit
def _replay_top_k(hist_row, k, n, KEY_SHIFT: tl.constexpr):
    """The top-k key prefix decided by the first n digit histograms (all of them: the k-th key)."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    digits = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)
    above = tl.full([], 0, tl.int32)
    for s in range(0, n):  # _digit_select, inlined (nested calls are slow in the interpreter)
        counts = tl.load(hist_row + s * 256 + digits)
        at_least = above + tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
        best = tl.max(tl.where(at_least >= k, digits, 0), axis=0)  # digit 0 always qualifies
        above += tl.sum(tl.where(digits > best, counts, 0), axis=0)
        prefix = prefix | (best.to(tl.uint32) << (KEY_BITS - 8 * (s + 1)))
    return prefix


@triton.jit
def _replay_top_p(pm_row, nsplit, s0, upto, prefix, top_p,
                  KEY_SHIFT: tl.constexpr, NSPLIT_P2: tl.constexpr):
    """(prefix, still searching) after top-p stages s0..upto-1, from their per-chunk masses."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    NSTAGE: tl.constexpr = KEY_BITS // 4
    c = tl.arange(0, NSPLIT_P2)
    cm = c < nsplit
    digits = tl.arange(0, 16)
    active = s0 < NSTAGE
    for s in range(s0, upto):
        if active:
            base = pm_row + (s * nsplit + c) * 32
            mass = tl.sum(tl.load(base[:, None] + digits[None, :], mask=cm[:, None], other=0.0), axis=0)
            target = top_p * tl.sum(tl.load(base + 16, mask=cm, other=0.0), axis=0)
            best = tl.max(tl.where(mass >= target, digits, 0), axis=0)
            prefix = prefix | (best.to(tl.uint32) << (KEY_BITS - 4 * (s + 1)))
            active = tl.sum(tl.load(base + 17, mask=cm, other=0.0), axis=0) >= target
    return prefix, active


@triton.jit(do_not_specialize=["step"])  # one compile for every pass (step == 1 would specialise)
def _split_step_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                       offsets_ptr, wsf_ptr, wsi_ptr, hist_ptr, pmass_ptr, V, row_stride, nsplit,
                       chunk, step, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr,
                       NSPLIT_P2: tl.constexpr, FAST: tl.constexpr):
    """Pass ``step`` for chunk program_id(1) of row program_id(0): 0 max (+ plain race, + top-k
    digit 0), 1..NDIG-1 top-k digits, then NSTAGE top-p stages, then the filtered race."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    NDIG: tl.constexpr = KEY_BITS // 8
    NSTAGE: tl.constexpr = KEY_BITS // 4
    row = tl.program_id(0)
    c = tl.program_id(1)
    temperature, inv_t, k, top_p, min_p, sampled, k_on, p_on, m_on, plain = _row_params(
        row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V)
    base = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK) + c * chunk
    wsf_row = wsf_ptr + row * nsplit * 4
    wsi_row = wsi_ptr + row * nsplit * 2
    hist_row = hist_ptr + row * (NDIG * 256)
    pm_row = pmass_ptr + row * (NSTAGE * nsplit * 32)
    d256 = tl.arange(0, 256)
    d16 = tl.arange(0, 16)
    if step == 0:
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        mi = tl.zeros([BLOCK], tl.int32)
        bi = tl.zeros([BLOCK], tl.int32)
        bx = tl.full([BLOCK], float("-inf"), tl.float32)
        be = tl.full([BLOCK], 1.0, tl.float32)
        if plain:
            h = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
            for off in range(0, chunk, BLOCK):
                idx = cols + off
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                gt = x > mx
                mi = tl.where(gt, idx, mi)
                mx = tl.where(gt, x, mx)
                bx, be, bi = _plain_step(x, idx, h, inv_t, bx, be, bi, FAST)
        else:
            counts = tl.zeros([256], tl.int32)
            for off in range(0, chunk, BLOCK):
                idx = cols + off
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                gt = x > mx
                mi = tl.where(gt, idx, mi)
                mx = tl.where(gt, x, mx)
                if k_on:
                    digit = (_ordered_key(x, KEY_SHIFT) >> (KEY_BITS - 8)).to(tl.int32)
                    counts += tl.histogram(digit, 256, mask=idx < V)
            if k_on:
                tl.atomic_add(hist_row + d256, counts, mask=counts > 0)
        m_c = tl.max(mx, axis=0)
        tl.store(wsf_row + c * 4, m_c)
        tl.store(wsi_row + c * 2, tl.min(tl.where(mx == m_c, mi, V), axis=0))
        if plain:
            g = tl.where(bx > float("-inf"), (bx - m_c) * inv_t - tl.log(be), float("-inf"))
            g_max = tl.max(g, axis=0)
            sel = tl.min(tl.where(g == g_max, bi, V), axis=0)
            pick = (bi == sel) & (g == g_max)
            tl.store(wsf_row + c * 4 + 1, tl.max(tl.where(pick, bx, float("-inf")), axis=0))
            tl.store(wsf_row + c * 4 + 2, tl.max(tl.where(pick, be, 0.0), axis=0))
            tl.store(wsi_row + c * 2 + 1, sel)
    elif step < NDIG:
        if k_on:
            prefix = _replay_top_k(hist_row, k, step, KEY_SHIFT)
            shift = KEY_BITS - 8 * (step + 1)
            high = _high_mask(shift + 8)
            counts = tl.zeros([256], tl.int32)
            for off in range(0, chunk, BLOCK):
                idx = cols + off
                key = _ordered_key(tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32), KEY_SHIFT)
                match = (idx < V) & ((key & high) == prefix)
                counts += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
            tl.atomic_add(hist_row + step * 256 + d256, counts, mask=counts > 0)
    elif step < NDIG + NSTAGE:
        if p_on:
            j = step - NDIG
            m = _chunk_max(wsf_row, nsplit, NSPLIT_P2)
            k_key = tl.full([], 0, tl.uint32)
            if k_on:
                k_key = _replay_top_k(hist_row, k, NDIG, KEY_SHIFT)
            lo, hi, s0 = _top_p_range(m, k_key, min_p, temperature, m_on, KEY_SHIFT)
            if j >= s0:
                prefix, active = _replay_top_p(pm_row, nsplit, s0, j, hi & _high_mask(KEY_BITS - 4 * s0),
                                               top_p, KEY_SHIFT, NSPLIT_P2)
                if active:
                    cand = prefix | (d16.to(tl.uint32) << (KEY_BITS - 4 * (j + 1)))
                    acc = tl.zeros([BLOCK, 16], tl.float32)
                    total = tl.zeros([BLOCK], tl.float32)
                    above_lo = tl.zeros([BLOCK], tl.float32)
                    for off in range(0, chunk, BLOCK):
                        idx = cols + off
                        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                        key = _ordered_key(x, KEY_SHIFT)
                        q = tl.exp((x - m) * inv_t)
                        q = tl.where((idx < V) & (key >= k_key), q, 0.0)
                        total += q
                        above_lo += tl.where(key >= lo, q, 0.0)
                        acc += tl.where(key[:, None] >= cand[None, :], q[:, None], 0.0)
                    dst = pm_row + (j * nsplit + c) * 32
                    tl.store(dst + d16, tl.sum(acc, axis=0))
                    tl.store(dst + 16, tl.sum(total, axis=0))
                    tl.store(dst + 17, tl.sum(above_lo, axis=0))
    else:
        if sampled & (not plain):
            m = _chunk_max(wsf_row, nsplit, NSPLIT_P2)
            k_key = tl.full([], 0, tl.uint32)
            if k_on:
                k_key = _replay_top_k(hist_row, k, NDIG, KEY_SHIFT)
            p_key = tl.full([], 0, tl.uint32)
            if p_on:
                lo, hi, s0 = _top_p_range(m, k_key, min_p, temperature, m_on, KEY_SHIFT)
                prefix, active = _replay_top_p(pm_row, nsplit, s0, NSTAGE, hi & _high_mask(KEY_BITS - 4 * s0),
                                               top_p, KEY_SHIFT, NSPLIT_P2)
                p_key = tl.minimum(prefix, hi)
            h = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
            bq = tl.zeros([BLOCK], tl.float32)
            be = tl.full([BLOCK], 1.0, tl.float32)
            bi = tl.zeros([BLOCK], tl.int32)
            for off in range(0, chunk, BLOCK):
                idx = cols + off
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                key = _ordered_key(x, KEY_SHIFT)
                thr = (idx < V) & (key >= k_key) & (key >= p_key)
                bq, be, bi = _race_step(x, idx, h, m, inv_t, thr, min_p, bq, be, bi, FAST)
            g = tl.where(bq > 0.0, tl.log(bq) - tl.log(be), float("-inf"))
            g_max = tl.max(g, axis=0)
            tl.store(wsf_row + c * 4 + 1, g_max)
            tl.store(wsi_row + c * 2 + 1, tl.min(tl.where(g == g_max, bi, V), axis=0))


@triton.jit
def _split_finish_kernel(temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, wsf_ptr, wsi_ptr,
                         out_ptr, V, nsplit, NSPLIT_P2: tl.constexpr):
    """Merge the per-chunk results of a row: first argmax, or the race winner (ties: lowest index)."""
    row = tl.program_id(0)
    temperature, inv_t, k, top_p, min_p, sampled, k_on, p_on, m_on, plain = _row_params(
        row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V)
    c = tl.arange(0, NSPLIT_P2)
    cm = c < nsplit
    wsf = wsf_ptr + (row * nsplit + c) * 4
    wsi = wsi_ptr + (row * nsplit + c) * 2
    cmax = tl.load(wsf, mask=cm, other=float("-inf"))
    m = tl.max(cmax, axis=0)
    tok = tl.min(tl.where(cmax == m, tl.load(wsi, mask=cm, other=V), V), axis=0)
    if sampled:
        a = tl.load(wsf + 1, mask=cm, other=float("-inf"))
        g = a
        if plain:  # a = x of the chunk's winner, E beside it: its score against the row max
            g = tl.where(a > float("-inf"), (a - m) * inv_t - tl.log(tl.load(wsf + 2, mask=cm, other=1.0)),
                         float("-inf"))
        g_max = tl.max(g, axis=0)
        win = tl.min(tl.where(g == g_max, tl.load(wsi + 1, mask=cm, other=V), V), axis=0)
        tok = tl.where(g_max > float("-inf"), win, tok)
    tl.store(out_ptr + row, tok.to(tl.int64))


def _key_shift(dtype) -> int:
    return {torch.bfloat16: 16, torch.float16: 8}.get(dtype, 0)


def _fast_math() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter has no libdevice


def split_plan(B: int, V: int, block: int | None = None, chunk: int | None = None):
    """(block, chunk, nsplit) of the split-row path for a [B, V] batch; static in (B, V)."""
    block = block or max(16, min(SPLIT_BLOCK, triton.next_power_of_2(V)))
    if chunk is None:
        per_row = max(1, SPLIT_PROGRAMS // max(B, 1))
        chunk = block * triton.cdiv(triton.cdiv(V, per_row), block)
    assert chunk % block == 0, "a chunk is a whole number of blocks"
    return block, chunk, triton.cdiv(V, chunk)


def use_split(B: int, V: int) -> bool:
    return B <= SPLIT_MAX_B and V > min(SPLIT_BLOCK, triton.next_power_of_2(V))


def launch(logits, temperature, top_k, top_p, min_p, seeds, offsets, out, *, path=None, block=None,
           num_warps=None, chunk=None, prefetch=True):
    """Launch with an explicit path ("row" or "split") and tile (tests, benchmarks); ``prefetch``:
    the row path issues the next block's load before working on the current one."""
    B, V = logits.shape
    if B == 0:
        return
    path = path or ("split" if use_split(B, V) else "row")
    shift = _key_shift(logits.dtype)
    if path == "row":
        block = block or max(16, min(BLOCK_MAX, triton.next_power_of_2(V)))
        _sample_kernel[(B,)](logits, temperature, top_k, top_p, min_p, seeds, offsets, out, V,
                             logits.stride(0), BLOCK=block, KEY_SHIFT=shift, FAST=_fast_math(),
                             PREFETCH=prefetch, num_warps=num_warps or NUM_WARPS)
        return
    block, chunk, nsplit = split_plan(B, V, block, chunk)
    key_bits = 32 - shift
    n_dig, n_stage = key_bits // 8, key_bits // 4
    dev = logits.device
    # workspace from static shapes only: chunk floats/ints, top-k histograms (zeroed: atomic adds)
    wsf = torch.empty(B * nsplit * (WSF + n_stage * PM), dtype=torch.float32, device=dev)
    wsi = torch.zeros(B * nsplit * WSI + B * n_dig * 256, dtype=torch.int32, device=dev)
    chunk_f, pmass = wsf[:B * nsplit * WSF], wsf[B * nsplit * WSF:]
    chunk_i, hist = wsi[:B * nsplit * WSI], wsi[B * nsplit * WSI:]
    p2 = max(16, triton.next_power_of_2(nsplit))  # fewer distinct compiles; masked lanes are free
    for step in range(n_dig + n_stage + 1):
        _split_step_kernel[(B, nsplit)](
            logits, temperature, top_k, top_p, min_p, seeds, offsets, chunk_f, chunk_i, hist, pmass,
            V, logits.stride(0), nsplit, chunk, step, BLOCK=block, KEY_SHIFT=shift, NSPLIT_P2=p2,
            FAST=_fast_math(), num_warps=num_warps or SPLIT_WARPS)
    _split_finish_kernel[(B,)](temperature, top_k, top_p, min_p, chunk_f, chunk_i, out, V, nsplit,
                               NSPLIT_P2=p2, num_warps=4)


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, out):
    """Triton sample: split-row for small batches, one program per row otherwise."""
    launch(logits, temperature, top_k, top_p, min_p, seeds, offsets, out)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs, options) for the sm_90 / sm_100 compile test."""
    targets = []
    for dtype, shift in (("fp32", 0), ("bf16", 16), ("fp16", 8)):
        common = {"logits_ptr": f"*{dtype}", "temperature_ptr": "*fp32", "top_k_ptr": "*i32",
                  "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seeds_ptr": "*i64",
                  "offsets_ptr": "*i64"}
        row_sig = {**common, "out_ptr": "*i64", "V": "i32", "row_stride": "i64",
                   "BLOCK": "constexpr", "KEY_SHIFT": "constexpr", "FAST": "constexpr", "PREFETCH": "constexpr"}
        targets.append((_sample_kernel, row_sig,
                        {"BLOCK": BLOCK_MAX, "KEY_SHIFT": shift, "FAST": True, "PREFETCH": True},
                        {"num_warps": NUM_WARPS}))
        split_sig = {**common, "wsf_ptr": "*fp32", "wsi_ptr": "*i32", "hist_ptr": "*i32",
                     "pmass_ptr": "*fp32", "V": "i32", "row_stride": "i64", "nsplit": "i32",
                     "chunk": "i32", "step": "i32", "BLOCK": "constexpr", "KEY_SHIFT": "constexpr",
                     "NSPLIT_P2": "constexpr", "FAST": "constexpr"}
        targets.append((_split_step_kernel, split_sig,
                        {"BLOCK": SPLIT_BLOCK, "KEY_SHIFT": shift, "NSPLIT_P2": 128, "FAST": True},
                        {"num_warps": SPLIT_WARPS}))
    finish_sig = {"temperature_ptr": "*fp32", "top_k_ptr": "*i32", "top_p_ptr": "*fp32",
                  "min_p_ptr": "*fp32", "wsf_ptr": "*fp32", "wsi_ptr": "*i32", "out_ptr": "*i64",
                  "V": "i32", "nsplit": "i32", "NSPLIT_P2": "constexpr"}
    targets.append((_split_finish_kernel, finish_sig, {"NSPLIT_P2": 128}, {"num_warps": 4}))
    return targets


def register(registry, common) -> None:
    registry.register(
        "sample", sample, dtypes=LOGIT_DTYPES,
        supports=lambda sig: None if sig.dim("V") < 2**31 - 2 * BLOCK_MAX else "V must fit int32 indexing",
        doc="Triton sampling: radix-selected top-k/top-p key thresholds, seeded exponential race; "
            "split-row passes for small batches",
        **common.kwargs(),
    )


__all__ = ["compile_targets", "launch", "register", "sample", "split_plan", "use_split"]
