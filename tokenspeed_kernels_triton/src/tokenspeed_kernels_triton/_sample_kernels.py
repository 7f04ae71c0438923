"""Triton ``sample``: the per-logit helpers shared by both paths and the one-program-per-row kernel.

See ``sample.py`` for the design. Everything here is a ``@triton.jit`` function; ``sample.py`` holds
the split-row kernels, the launchers and the registration.

Arithmetic on the hot path (v3):
* E = -log(u): ``-ln2 * log2(u)`` for u < 3/4 (MUFU ``lg2.approx`` on the GPU: absolute error
  ~2^-22 on log2, so relative error < 6e-7 since |log2 u| > 0.41 there), and for u >= 3/4 the
  series 2 atanh(t), t = v / (2 - v) <= 1/7 (v = 1 - u, exact) with 5 terms (< 4e-10) and a fast
  (``div.full``) division. PTX's approximate log has an absolute, not relative, error near u = 1,
  and the winners of the race are exactly the tokens with u near 1: hence the series there.
* The race compares q / E without taking logs: a lane keeps its best (q, E) and a token wins iff
  q * E_best > q_best * E (filtered rows, q = exp(z) is needed for min-p anyway), or, for plain rows
  that run the race before the max is known, exp((x - x_best) / T) * E_best > E. One ex2 per logit
  instead of v2's two precise logf. Logs are taken once per lane when the lanes are merged.
Under the interpreter (``FAST`` off) log2 is numpy's; both stay far inside the spec's compare
tolerance (relative 2^-16 on the race score).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

LN2 = 0.6931471805599453


@triton.jit
def _fmix32(x):
    # murmur3 finaliser on uint32 (multiplications wrap mod 2^32, shifts are logical)
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_key(seed, offset):
    """The spec's per-row key from int64 seed and offset (their 32-bit halves)."""
    h = tl.full([], 0x243F6A88, tl.uint32)
    h = _fmix32(h ^ seed.to(tl.uint32)) + 0x9E3779B9
    h = _fmix32(h ^ (seed >> 32).to(tl.uint32)) + 0x9E3779B9
    h = _fmix32(h ^ offset.to(tl.uint32)) + 0x9E3779B9
    h = _fmix32(h ^ (offset >> 32).to(tl.uint32)) + 0x9E3779B9
    return h


@triton.jit
def _random_bits(idx, h):
    """bits_i of the spec for int32 vocabulary indices ``idx`` and row key ``h``."""
    # the two fmix32 rounds written out: nested jit calls are slow under the interpreter
    x = idx.to(tl.uint32) * 0x9E3779B9 + h
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    x ^= h
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x)  # lg2.approx.ftz (the interpreter has no libdevice)
    else:
        return tl.log2(x)


@triton.jit
def _exponential(bits, FAST: tl.constexpr = False):
    """E = -log(u), u = ((bits >> 8) + 0.5) / 2^24, to < 1e-6 relative over all of (0, 1)."""
    k = (bits >> 8).to(tl.float32)  # exact: 24 bits
    u = (k + 0.5) * 5.9604644775390625e-08  # exact
    v = ((16777216.0 - k) - 0.5) * 5.9604644775390625e-08  # 1 - u, exact for k >= 2^23
    # u >= 3/4: -log(1 - v) = 2 atanh(t), t = v / (2 - v) <= 1/7, five odd terms
    t = tl.fdiv(v, 2.0 - v)
    t2 = t * t
    s = 1.0 / 9.0
    s = s * t2 + 1.0 / 7.0
    s = s * t2 + 1.0 / 5.0
    s = s * t2 + 1.0 / 3.0
    s = s * t2 + 1.0
    return tl.where(k < 12582912.0, -0.6931471805599453 * _log2(u, FAST), 2.0 * t * s)


@triton.jit
def _ordered_key(x, KEY_SHIFT: tl.constexpr):
    """uint32 key with key(a) < key(b) iff a < b for float32 x (-0 and +0 share one key).

    KEY_SHIFT drops low bits that are constant for the input dtype (16 for bf16, 8 for fp16: their
    float32 images have zero low mantissa bits), which keeps the order and saves radix passes."""
    b = x.to(tl.uint32, bitcast=True)
    key = tl.where((b >> 31) != 0, ~b, b | 0x80000000)
    key = tl.where(x == 0.0, tl.full(x.shape, 0x80000000, tl.uint32), key)
    return key >> KEY_SHIFT


@triton.jit
def _load_row(base, idx, V):
    return tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)


@triton.jit
def _high_mask(shift):
    """uint32 mask of the key bits at and above ``shift`` (0 <= shift <= 32), via int64."""
    return ((tl.full([], 0xFFFFFFFF, tl.int64) << shift) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _row_params(row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V):
    """Per-row knobs and which filters are on (the spec's 'off' conventions)."""
    temperature = tl.load(temperature_ptr + row)
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p_in = tl.load(min_p_ptr + row)
    sampled = temperature > 0
    k_on = sampled & (k > 0) & (k < V)
    p_on = sampled & (top_p < 1.0)
    m_on = sampled & (min_p_in > 0.0)
    plain = sampled & (not k_on) & (not p_on) & (not m_on)
    inv_t = 1.0 / tl.where(sampled, temperature, 1.0)
    min_p = tl.minimum(tl.maximum(min_p_in, 0.0), 1.0)  # <= 0 is off: q >= 0 always holds
    return temperature, inv_t, k, top_p, min_p, sampled, k_on, p_on, m_on, plain


@triton.jit
def _top_p_range(m, k_key, min_p, temperature, m_on, KEY_SHIFT: tl.constexpr):
    """(lo, hi, first stage) of the top-p search: between lo = max(top-k key, a key safely below
    the min-p cut) and the max key; the leading 4-bit digits both share need no pass."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    NSTAGE: tl.constexpr = KEY_BITS // 4
    hi = _ordered_key(m, KEY_SHIFT)
    lo = k_key
    if m_on:
        # a logit safely below the min-p cut z = log(min_p): every token min-p keeps is above
        x_cut = m + (tl.log(tl.maximum(min_p, 1e-30)) - 0.01) * temperature
        x_cut = x_cut - tl.abs(m) * 1e-6
        lo = tl.maximum(lo, _ordered_key(x_cut, 0) >> KEY_SHIFT)
    stages = tl.arange(0, 8)  # NSTAGE is 4, 6 or 8; arange needs a power of two
    shifts = tl.maximum(KEY_BITS - 4 * (stages + 1), 0).to(tl.uint32)
    s0 = tl.sum(((stages < NSTAGE) & ((lo ^ hi) >> shifts == 0)).to(tl.int32), axis=0)
    return lo, hi, s0


@triton.jit
def _digit_select(counts, digits, above, k):
    """Radix-select step: the largest digit d with (#keys above the prefix) + #(digit >= d) >= k."""
    at_least = above + tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    best = tl.max(tl.where(at_least >= k, digits, 0), axis=0)  # digit 0 always qualifies
    return best, above + tl.sum(tl.where(digits > best, counts, 0), axis=0)


@triton.jit
def _kth_largest_key(base, V, k, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr, PREFETCH: tl.constexpr):
    """The k-th largest key (1 <= k < V), exactly: radix select, an 8-bit digit per pass."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)  # the digits found so far, in place
    above = tl.full([], 0, tl.int32)  # tokens whose key is above every candidate with this prefix
    for s in range(KEY_BITS // 8):  # a runtime loop keeps the PTX small
        shift = KEY_BITS - 8 * (s + 1)
        high = _high_mask(shift + 8)
        counts = tl.zeros([256], tl.int32)
        x_next = _load_row(base, cols, V)  # unused (removed) without PREFETCH
        for start in range(0, V, BLOCK):
            idx = start + cols
            if PREFETCH:  # the next block's load is in flight while this block is processed
                x = x_next
                x_next = _load_row(base, idx + BLOCK, V)
            else:
                x = _load_row(base, idx, V)
            key = _ordered_key(x, KEY_SHIFT)
            match = (idx < V) & ((key & high) == prefix)
            counts += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        best, above = _digit_select(counts, digits, above, k)
        prefix = prefix | (best.to(tl.uint32) << shift)
    return prefix


@triton.jit
def _top_p_key(base, V, m, inv_t, k_key, lo, hi, s0, top_p,
               BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr, PREFETCH: tl.constexpr):
    """The largest key t with mass(key >= t, within top-k) >= top_p * mass(top-k), capped at hi.

    Searched only in [lo, hi]: if the mass above lo is already below the target, any t <= lo
    keeps the same final set (min-p keeps nothing below lo), so the search stops there."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    NSTAGE: tl.constexpr = KEY_BITS // 4
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16)
    prefix = hi & _high_mask(KEY_BITS - 4 * s0)
    active = s0 < NSTAGE
    for s in range(s0, NSTAGE):
        shift = KEY_BITS - 4 * (s + 1)
        cand = prefix | (digits.to(tl.uint32) << shift)
        acc = tl.zeros([BLOCK, 16], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        above_lo = tl.zeros([BLOCK], tl.float32)
        x_next = _load_row(base, cols, V)
        for start in range(0, tl.where(active, V, 0), BLOCK):
            idx = start + cols
            if PREFETCH:  # the next block's load is in flight while this block is processed
                x = x_next
                x_next = _load_row(base, idx + BLOCK, V)
            else:
                x = _load_row(base, idx, V)
            key = _ordered_key(x, KEY_SHIFT)
            q = tl.exp((x - m) * inv_t)
            q = tl.where((idx < V) & (key >= k_key), q, 0.0)
            total += q
            above_lo += tl.where(key >= lo, q, 0.0)
            acc += tl.where(key[:, None] >= cand[None, :], q[:, None], 0.0)
        if active:
            target = top_p * tl.sum(total, axis=0)
            mass = tl.sum(acc, axis=0)
            best = tl.max(tl.where(mass >= target, digits, 0), axis=0)
            prefix = prefix | (best.to(tl.uint32) << shift)
            active = tl.sum(above_lo, axis=0) >= target
    return tl.minimum(prefix, hi)


@triton.jit
def _race_step(x, idx, h, m, inv_t, thr, min_p, bq, be, bi, FAST: tl.constexpr):
    """One chunk of the filtered race: lane bests (q, E, index); q * E_best > q_best * E wins.

    ``thr``: the token clears the top-k and top-p keys; min-p is checked here on q."""
    q = tl.exp((x - m) * inv_t)
    e = _exponential(_random_bits(idx, h), FAST)
    win = thr & (q >= min_p) & (q * be > bq * e)  # q_best = 0 until a kept token with q > 0
    return tl.where(win, q, bq), tl.where(win, e, be), tl.where(win, idx, bi)


@triton.jit
def _plain_step(x, idx, h, inv_t, bx, be, bi, FAST: tl.constexpr):
    """One chunk of the race before the max is known: exp((x - x_best) / T) * E_best > E wins.

    -inf tokens never win (exp(NaN) compares false); the first finite token beats x_best = -inf."""
    e = _exponential(_random_bits(idx, h), FAST)
    win = tl.exp((x - bx) * inv_t) * be > e
    return tl.where(win, x, bx), tl.where(win, e, be), tl.where(win, idx, bi)


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                   offsets_ptr, out_ptr, V, row_stride,
                   BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr, FAST: tl.constexpr,
                   PREFETCH: tl.constexpr):
    """One program per row (large batches)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK)
    temperature, inv_t, k, top_p, min_p, sampled, k_on, p_on, m_on, plain = _row_params(
        row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, V)
    h = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))

    # pass 1: per-lane max and its first index (a lane sees increasing indices: strict >)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    mi = tl.zeros([BLOCK], tl.int32)
    bi = tl.zeros([BLOCK], tl.int32)  # per-lane race winner: index, x (plain) or q, and E
    bx = tl.full([BLOCK], float("-inf"), tl.float32)
    be = tl.full([BLOCK], 1.0, tl.float32)
    if plain:
        x_next = _load_row(base, cols, V)
        for start in range(0, V, BLOCK):
            idx = start + cols
            if PREFETCH:  # the next block's load is in flight while this block is processed
                x = x_next
                x_next = _load_row(base, idx + BLOCK, V)
            else:
                x = _load_row(base, idx, V)
            gt = x > mx
            mi = tl.where(gt, idx, mi)
            mx = tl.where(gt, x, mx)
            bx, be, bi = _plain_step(x, idx, h, inv_t, bx, be, bi, FAST)
    else:
        x_next = _load_row(base, cols, V)
        for start in range(0, V, BLOCK):
            idx = start + cols
            if PREFETCH:  # the next block's load is in flight while this block is processed
                x = x_next
                x_next = _load_row(base, idx + BLOCK, V)
            else:
                x = _load_row(base, idx, V)
            gt = x > mx
            mi = tl.where(gt, idx, mi)
            mx = tl.where(gt, x, mx)
    m = tl.max(mx, axis=0)
    arg = tl.min(tl.where(mx == m, mi, V), axis=0)
    tok = arg
    if plain:
        g = tl.where(bx > float("-inf"), (bx - m) * inv_t - tl.log(be), float("-inf"))
        g_max = tl.max(g, axis=0)
        tok = tl.where(g_max > float("-inf"), tl.min(tl.where(g == g_max, bi, V), axis=0), arg)
    elif sampled:
        k_key = tl.full([], 0, tl.uint32)  # key 0 keeps every logit, -inf included
        if k_on:
            k_key = _kth_largest_key(base, V, k, BLOCK, KEY_SHIFT, PREFETCH)
        p_key = tl.full([], 0, tl.uint32)
        if p_on:
            lo, hi, s0 = _top_p_range(m, k_key, min_p, temperature, m_on, KEY_SHIFT)
            p_key = _top_p_key(base, V, m, inv_t, k_key, lo, hi, s0, top_p, BLOCK, KEY_SHIFT, PREFETCH)
        bq = tl.zeros([BLOCK], tl.float32)
        x_next = _load_row(base, cols, V)
        for start in range(0, V, BLOCK):
            idx = start + cols
            if PREFETCH:  # the next block's load is in flight while this block is processed
                x = x_next
                x_next = _load_row(base, idx + BLOCK, V)
            else:
                x = _load_row(base, idx, V)
            key = _ordered_key(x, KEY_SHIFT)
            thr = (idx < V) & (key >= k_key) & (key >= p_key)
            bq, be, bi = _race_step(x, idx, h, m, inv_t, thr, min_p, bq, be, bi, FAST)
        g = tl.where(bq > 0.0, tl.log(bq) - tl.log(be), float("-inf"))
        g_max = tl.max(g, axis=0)
        tok = tl.where(g_max > float("-inf"), tl.min(tl.where(g == g_max, bi, V), axis=0), arg)
    tl.store(out_ptr + row, tok.to(tl.int64))
