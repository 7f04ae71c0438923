"""Triton ``sample``: temperature, top-k, top-p, min-p and the seeded exponential race, in one kernel.

One program per row; every decision stays on the device (no host sync, graph-capturable). The row
is streamed in BLOCK chunks, several times:

1. max and first argmax of the logits (greedy rows stop here);
2. top-k (if on): the k-th largest logit found EXACTLY by a radix search over the order-preserving
   uint32 key of each float32 logit: RADIX_BITS bits per pass, each pass counting, for all
   2^RADIX_BITS candidate prefixes at once, the logits whose key is >= the candidate (32 /
   RADIX_BITS passes, 8 by default, instead of a sort or 32 bisection passes);
3. top-p (if on): the normaliser over the top-k set, then the same radix search over the keys of
   q = exp(z) (positive floats order like their bits), with mass instead of counts: the largest
   threshold whose set holds mass >= top_p;
4. the race: argmax of z - log(E) over the kept tokens, E from the spec's counter-based hash.

The hash is computed in uint32 arithmetic exactly as the spec defines it. E = -log(u) is evaluated
as -log(u) for u < 1/2 and through an atanh series in v = 1 - u above, so its relative accuracy
does not depend on how accurate ``log`` is near 1 (PTX's approximate log has an absolute, not
relative, error there, and the winners of the race are exactly the tokens with u near 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tokenspeed_core.ops.sample import LOGIT_DTYPES

BLOCK_MAX = 1024
RADIX_BITS = 4


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
def _ordered_key(x):
    """uint32 key with key(a) < key(b) iff a < b for float32 (-0 and +0 share one key)."""
    b = x.to(tl.uint32, bitcast=True)
    key = tl.where((b >> 31) != 0, ~b, b | 0x80000000)
    return tl.where(x == 0.0, tl.full(x.shape, 0x80000000, tl.uint32), key)


@triton.jit
def _load_row(base, idx, V):
    return tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)


@triton.jit
def _kth_largest_key(base, V, k, BLOCK: tl.constexpr, RADIX: tl.constexpr):
    """Largest key t with count(key(logit) >= t) >= k: the k-th largest logit's key, exactly."""
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 1 << RADIX).to(tl.uint32)
    prefix = tl.full([], 0, tl.uint32)
    for s in range(32 // RADIX):  # a runtime loop: unrolled, 8 stages bloat the PTX ~8x
        shift = tl.cast(32 - RADIX * (s + 1), tl.uint32)
        cand = prefix | (digits << shift)
        counts = tl.zeros([1 << RADIX], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            key = _ordered_key(_load_row(base, idx, V))
            ge = (key[:, None] >= cand[None, :]) & (idx < V)[:, None]
            counts += tl.sum(ge.to(tl.int32), axis=0)
        # counts fall with the digit; digit 0 (= prefix) always qualifies by induction
        best = tl.max(tl.where(counts >= k, digits, 0), axis=0)
        prefix = prefix | (best << shift)
    return prefix


@triton.jit
def _top_p_key(base, V, m, inv_t, k_key, top_p, BLOCK: tl.constexpr, RADIX: tl.constexpr):
    """Largest key t of q = exp(z) with mass(q >= t over the top-k set) >= top_p * total."""
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = _load_row(base, idx, V)
        q = tl.exp((x - m) * inv_t)
        total += tl.sum(tl.where((idx < V) & (_ordered_key(x) >= k_key), q, 0.0), axis=0)
    target = top_p * total
    digits = tl.arange(0, 1 << RADIX).to(tl.uint32)
    prefix = tl.full([], 0, tl.uint32)
    for s in range(32 // RADIX):  # a runtime loop: unrolled, 8 stages bloat the PTX ~8x
        shift = tl.cast(32 - RADIX * (s + 1), tl.uint32)
        cand = prefix | (digits << shift)
        mass = tl.zeros([1 << RADIX], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = _load_row(base, idx, V)
            q = tl.exp((x - m) * inv_t)
            q = tl.where((idx < V) & (_ordered_key(x) >= k_key), q, 0.0)
            qkey = q.to(tl.uint32, bitcast=True)
            mass += tl.sum(tl.where(qkey[:, None] >= cand[None, :], q[:, None], 0.0), axis=0)
        best = tl.max(tl.where(mass >= target, digits, 0), axis=0)
        prefix = prefix | (best << shift)
    return prefix


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                   offsets_ptr, out_ptr, V, row_stride,
                   BLOCK: tl.constexpr, RADIX: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK)

    # pass 1: max and its first index (earlier chunks win ties: strict >)
    m = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = _load_row(base, idx, V)
        cmax = tl.max(x, axis=0)
        cidx = tl.min(tl.where((x == cmax) & (idx < V), idx, V), axis=0)
        arg = tl.where(cmax > m, cidx, arg)
        m = tl.maximum(m, cmax)

    temperature = tl.load(temperature_ptr + row)
    tok = arg
    if temperature > 0:
        inv_t = 1.0 / temperature
        k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        # min-p <= 0 is off: q >= 0 holds for every token
        min_p = tl.minimum(tl.maximum(tl.load(min_p_ptr + row), 0.0), 1.0)
        k_key = tl.full([], 0, tl.uint32)  # key 0 keeps every logit, -inf included
        if (k > 0) & (k < V):
            k_key = _kth_largest_key(base, V, k, BLOCK, RADIX)
        p_key = tl.full([], 0, tl.uint32)
        if top_p < 1.0:
            p_key = _top_p_key(base, V, m, inv_t, k_key, top_p, BLOCK, RADIX)
        h = _row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
        best = tl.full([], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = _load_row(base, idx, V)
            z = (x - m) * inv_t
            q = tl.exp(z)
            keep = (idx < V) & (_ordered_key(x) >= k_key) & (q.to(tl.uint32, bitcast=True) >= p_key)
            keep = keep & (q >= min_p)
            g = z - tl.log(_exponential(_random_bits(idx, h)))
            g = tl.where(keep, g, float("-inf"))
            cmax = tl.max(g, axis=0)
            cidx = tl.min(tl.where((g == cmax) & keep, idx, V), axis=0)
            tok = tl.where(cmax > best, cidx, tok)
            best = tl.maximum(best, cmax)
    tl.store(out_ptr + row, tok.to(tl.int64))


def _block(V: int) -> int:
    return max(16, min(BLOCK_MAX, triton.next_power_of_2(V)))


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, out):
    """Triton sample: one program per row; filters and the seeded race on the device."""
    B, V = logits.shape
    if B == 0:
        return
    _sample_kernel[(B,)](logits, temperature, top_k, top_p, min_p, seeds, offsets, out, V,
                         logits.stride(0), BLOCK=_block(V), RADIX=RADIX_BITS, num_warps=4)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) for the sm_90 / sm_100 compile test."""
    targets = []
    for dtype in ("fp32", "bf16", "fp16"):
        sig = {"logits_ptr": f"*{dtype}", "temperature_ptr": "*fp32", "top_k_ptr": "*i32",
               "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seeds_ptr": "*i64", "offsets_ptr": "*i64",
               "out_ptr": "*i64", "V": "i32", "row_stride": "i64",
               "BLOCK": "constexpr", "RADIX": "constexpr"}
        targets.append((_sample_kernel, sig, {"BLOCK": BLOCK_MAX, "RADIX": RADIX_BITS}))
    return targets


def register(registry, common) -> None:
    registry.register(
        "sample", sample, dtypes=LOGIT_DTYPES,
        supports=lambda sig: None if sig.dim("V") < 2**31 - BLOCK_MAX else "V must fit int32 indexing",
        doc="Triton sampling: radix-searched top-k/top-p thresholds, seeded exponential race",
        **common.kwargs(),
    )


__all__ = ["compile_targets", "register", "sample"]
