"""Triton ``sample``: temperature, top-k, top-p, min-p and the seeded exponential race, in one kernel.

One program per row; every decision is taken per row on the device (no host sync, graph-capturable).
Every filter keeps an upper set of the logits (q = exp((x - m) / T) is monotone in x), so each is a
threshold on the order-preserving integer key of x (16 bits for bf16, 32 otherwise), and the kept
set is the tokens whose key clears all thresholds. The row is streamed in BLOCK chunks:

1. max and first argmax. Rows with no filter (the common agent case) run the race in this same
   pass: each lane keeps its best (x, log E) and compares a new token by (x - x_best) / T against
   log E - log E_best, which needs no max; the lanes are merged with the max at the end. Greedy
   rows stop after this pass.
2. top-k (if on): the k-th largest key, exactly, by a radix select with 8-bit digits, each pass a
   ``tl.histogram`` of the digit under the prefix found so far (2 passes for bf16, 4 for fp32).
3. top-p (if on): the largest key t whose set {key >= t} (within top-k) holds mass >= top_p * total,
   by a radix search with 4-bit digits, the 16 candidate masses per pass kept per lane and reduced
   once per pass. It only searches between lo = max(top-k key, a key safely below the min-p cut)
   and the max key: the digits common to both are skipped, and once the mass above lo is below the
   target the search stops (min-p then decides).
4. the race over the kept tokens: argmax of z - log(E), E from the spec's counter-based hash.

The hash is computed in uint32 arithmetic exactly as the spec defines it. E = -log(u) is evaluated
as -log(u) for u < 1/2 and through an atanh series in v = 1 - u above, so its relative accuracy
does not depend on how accurate ``log`` is near 1 (PTX's approximate log has an absolute, not
relative, error there, and the winners of the race are exactly the tokens with u near 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_core.ops.sample import LOGIT_DTYPES

BLOCK_MAX = 1024
NUM_WARPS = 8


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
    i = idx.to(tl.uint32)
    return _fmix32(_fmix32(i * 0x9E3779B9 + h) ^ h)


@triton.jit
def _exponential(bits):
    """E = -log(u), u = ((bits >> 8) + 0.5) / 2^24, to a few ulp relative over all of (0, 1)."""
    k = (bits >> 8).to(tl.float32)  # exact: 24 bits
    u = (k + 0.5) * 5.9604644775390625e-08  # exact for k < 2^23
    v = ((16777216.0 - k) - 0.5) * 5.9604644775390625e-08  # 1 - u, exact for k >= 2^23
    # -log(1 - v) = 2 atanh(t), t = v / (2 - v) <= 1/3: eight odd terms leave < 2e-9 relative
    t = v / (2.0 - v)
    t2 = t * t
    s = 1.0 / 15.0
    s = s * t2 + 1.0 / 13.0
    s = s * t2 + 1.0 / 11.0
    s = s * t2 + 1.0 / 9.0
    s = s * t2 + 1.0 / 7.0
    s = s * t2 + 1.0 / 5.0
    s = s * t2 + 1.0 / 3.0
    s = s * t2 + 1.0
    return tl.where(k < 8388608.0, -tl.log(u), 2.0 * t * s)


@triton.jit
def _ordered_key(x, KEY_SHIFT: tl.constexpr):
    """uint32 key with key(a) < key(b) iff a < b for float32 x (-0 and +0 share one key).

    KEY_SHIFT = 16 for values that came from bf16: their low 16 float32 bits are zero, so the
    key's low 16 bits are constant and dropping them keeps the order (fewer radix passes)."""
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
def _kth_largest_key(base, V, k, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr):
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
        for start in range(0, V, BLOCK):
            idx = start + cols
            key = _ordered_key(_load_row(base, idx, V), KEY_SHIFT)
            match = (idx < V) & ((key & high) == prefix)
            counts += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        at_least = above + tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # digit >= d
        # at_least falls with the digit; digit 0 always qualifies by induction
        best = tl.max(tl.where(at_least >= k, digits, 0), axis=0)
        above += tl.sum(tl.where(digits > best, counts, 0), axis=0)
        prefix = prefix | (best.to(tl.uint32) << shift)
    return prefix


@triton.jit
def _top_p_key(base, V, m, inv_t, k_key, lo, hi, top_p,
               BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr):
    """The largest key t with mass(key >= t, within top-k) >= top_p * mass(top-k), capped at hi.

    Searched only in [lo, hi]: if the mass above lo is already below the target, any t <= lo
    keeps the same final set (min-p keeps nothing below lo), so the search stops there."""
    KEY_BITS: tl.constexpr = 32 - KEY_SHIFT
    NSTAGE: tl.constexpr = KEY_BITS // 4
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16)
    stages = tl.arange(0, NSTAGE)
    # stages whose digit lo and hi share need no pass
    s0 = tl.sum(((lo ^ hi) >> (KEY_BITS - 4 * (stages + 1)).to(tl.uint32) == 0).to(tl.int32), axis=0)
    prefix = hi & _high_mask(KEY_BITS - 4 * s0)
    active = s0 < NSTAGE
    for s in range(s0, NSTAGE):
        shift = KEY_BITS - 4 * (s + 1)
        cand = prefix | (digits.to(tl.uint32) << shift)
        acc = tl.zeros([BLOCK, 16], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        above_lo = tl.zeros([BLOCK], tl.float32)
        for start in range(0, tl.where(active, V, 0), BLOCK):
            idx = start + cols
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
def _sample_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                   offsets_ptr, out_ptr, V, row_stride,
                   BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK)

    temperature = tl.load(temperature_ptr + row)
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p_in = tl.load(min_p_ptr + row)
    sampled = temperature > 0
    k_on = (k > 0) & (k < V)
    p_on = top_p < 1.0
    m_on = min_p_in > 0.0
    plain = sampled & (not k_on) & (not p_on) & (not m_on)
    inv_t = 1.0 / tl.where(sampled, temperature, 1.0)
    h = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))

    # pass 1: per-lane max and its first index (a lane sees increasing indices: strict >)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    mi = tl.zeros([BLOCK], tl.int32)
    bi = tl.zeros([BLOCK], tl.int32)  # plain rows: per-lane race winner, its x and log E
    bx = tl.full([BLOCK], float("-inf"), tl.float32)
    bl = tl.zeros([BLOCK], tl.float32)
    if plain:
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = _load_row(base, idx, V)
            gt = x > mx
            mi = tl.where(gt, idx, mi)
            mx = tl.where(gt, x, mx)
            log_e = tl.log(_exponential(_random_bits(idx, h)))
            # z - log E beats z_best - log E_best; -inf tokens never win (their difference is NaN)
            win = (x - bx) * inv_t > log_e - bl
            bi = tl.where(win, idx, bi)
            bx = tl.where(win, x, bx)
            bl = tl.where(win, log_e, bl)
    else:
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = _load_row(base, idx, V)
            gt = x > mx
            mi = tl.where(gt, idx, mi)
            mx = tl.where(gt, x, mx)
    m = tl.max(mx, axis=0)
    arg = tl.min(tl.where(mx == m, mi, V), axis=0)
    tok = arg
    if plain:
        g = tl.where(bx > float("-inf"), (bx - m) * inv_t - bl, float("-inf"))
        g_max = tl.max(g, axis=0)
        tok = tl.where(g_max > float("-inf"), tl.min(tl.where(g == g_max, bi, V), axis=0), arg)
    elif sampled:
        min_p = tl.minimum(tl.maximum(min_p_in, 0.0), 1.0)  # <= 0 is off: q >= 0 always holds
        hi = _ordered_key(m, KEY_SHIFT)
        k_key = tl.full([], 0, tl.uint32)  # key 0 keeps every logit, -inf included
        if k_on:
            k_key = _kth_largest_key(base, V, k, BLOCK, KEY_SHIFT)
        p_key = tl.full([], 0, tl.uint32)
        if p_on:
            lo = k_key
            if m_on:
                # a logit safely below the min-p cut z = log(min_p): every token min-p keeps is above
                x_cut = m + (tl.log(tl.maximum(min_p, 1e-30)) - 0.01) * temperature
                x_cut = x_cut - tl.abs(m) * 1e-6
                lo = tl.maximum(lo, _ordered_key(x_cut, 0) >> KEY_SHIFT)
            p_key = _top_p_key(base, V, m, inv_t, k_key, lo, hi, top_p, BLOCK, KEY_SHIFT)
        bs = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = _load_row(base, idx, V)
            key = _ordered_key(x, KEY_SHIFT)
            z = (x - m) * inv_t
            keep = (idx < V) & (key >= k_key) & (key >= p_key) & (tl.exp(z) >= min_p)
            g = tl.where(keep, z - tl.log(_exponential(_random_bits(idx, h))), float("-inf"))
            win = g > bs
            bi = tl.where(win, idx, bi)
            bs = tl.where(win, g, bs)
        g_max = tl.max(bs, axis=0)
        tok = tl.where(g_max > float("-inf"), tl.min(tl.where(bs == g_max, bi, V), axis=0), arg)
    tl.store(out_ptr + row, tok.to(tl.int64))


def _key_shift(dtype) -> int:
    return 16 if dtype == torch.bfloat16 else 0


def launch(logits, temperature, top_k, top_p, min_p, seeds, offsets, out, *, block=None,
           num_warps=None):
    """Launch with an explicit tile (benchmarks); ``sample`` picks the defaults."""
    B, V = logits.shape
    if B == 0:
        return
    block = block or max(16, min(BLOCK_MAX, triton.next_power_of_2(V)))
    _sample_kernel[(B,)](logits, temperature, top_k, top_p, min_p, seeds, offsets, out, V,
                         logits.stride(0), BLOCK=block, KEY_SHIFT=_key_shift(logits.dtype),
                         num_warps=num_warps or NUM_WARPS)


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, out):
    """Triton sample: one program per row; filters and the seeded race on the device."""
    launch(logits, temperature, top_k, top_p, min_p, seeds, offsets, out)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) for the sm_90 / sm_100 compile test."""
    targets = []
    for dtype in ("fp32", "bf16", "fp16"):
        sig = {"logits_ptr": f"*{dtype}", "temperature_ptr": "*fp32", "top_k_ptr": "*i32",
               "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seeds_ptr": "*i64", "offsets_ptr": "*i64",
               "out_ptr": "*i64", "V": "i32", "row_stride": "i64",
               "BLOCK": "constexpr", "KEY_SHIFT": "constexpr"}
        targets.append((_sample_kernel, sig, {"BLOCK": BLOCK_MAX, "KEY_SHIFT": 16 if dtype == "bf16" else 0}))
    return targets


def register(registry, common) -> None:
    registry.register(
        "sample", sample, dtypes=LOGIT_DTYPES,
        supports=lambda sig: None if sig.dim("V") < 2**31 - BLOCK_MAX else "V must fit int32 indexing",
        doc="Triton sampling: radix-selected top-k/top-p key thresholds, seeded exponential race",
        **common.kwargs(),
    )


__all__ = ["compile_targets", "launch", "register", "sample"]
