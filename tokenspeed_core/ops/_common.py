"""Helpers shared by op specs: random inputs, tolerances, byte counting."""

from __future__ import annotations

from typing import Any

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# (atol, rtol) per dtype for ops whose result is one rounding of a well-conditioned value.
ELEMENTWISE_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),  # one bf16 ulp (2^-7 relative) plus accumulated rounding
}
# Reductions over long axes (attention, matmul): tf32-class fp32 dot products allowed.
ATTENTION_TOL = {
    torch.float32: (2e-3, 2e-3),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


# Tensors at least this large are drawn on the target device: benchmark presets hold caches of
# gigabytes, which the CPU takes minutes to fill. Still reproducible: the device generator is
# seeded from ``gen``.
DEVICE_RNG_MIN = 1 << 22


def _device_generator(gen: torch.Generator, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return g


def randn(shape, dtype: torch.dtype, gen: torch.Generator, device, scale: float = 1.0) -> torch.Tensor:
    """Normal random values, reproducible from ``gen`` (drawn on the device when large)."""
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    if device.type == "cuda" and numel >= DEVICE_RNG_MIN:
        t = torch.randn(shape, generator=_device_generator(gen, device), dtype=torch.float32, device=device)
        return (t * scale).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    return t.to(dtype).to(device)


def randint(low: int, high: int, shape, gen: torch.Generator, device, dtype=torch.int32) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype).to(device)


def ragged_lengths(batch: int, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """``batch`` lengths in [lo, hi], always including ``hi`` and ``lo`` when batch allows."""
    if batch == 0:
        return []
    lens = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    lens[0] = hi
    if batch > 1:
        lens[-1] = lo
    return lens


def nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_paged_cache(
    seqlens: list[int], page_size: int, row_shape: tuple[int, ...], dtype: torch.dtype,
    gen: torch.Generator, device, *, scale: float = 1.0, spare_pages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged cache holding ``seqlens[b]`` rows per request, pages shuffled across requests.

    Rows past a request's length (in its last page, and whole spare pages) hold large finite
    garbage: a kernel that reads them without masking produces a visibly wrong result.
    Returns (cache [num_pages, page_size, *row_shape], page_table [B, max_pages] int32).
    """
    pages_per = [(s + page_size - 1) // page_size for s in seqlens]
    max_pages = max(pages_per, default=0) + 1  # one padding column always
    num_pages = sum(pages_per) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    garbage = 64.0 if dtype != torch.float8_e4m3fn else 8.0
    # drawn where it will live (large caches on the GPU); float32 while values are placed
    cache = randn((num_pages, page_size, *row_shape), torch.float32, gen, device, scale=scale * garbage)
    table = torch.empty((len(seqlens), max_pages), dtype=torch.int64)
    nxt = 0
    for b, (s, n) in enumerate(zip(seqlens, pages_per, strict=True)):
        own = perm[nxt : nxt + n]
        nxt += n
        # padding entries point at spare (garbage) pages: valid ids, never meant to be read
        pad = perm[sum(pages_per) + torch.randint(0, spare_pages, (max_pages - n,), generator=gen)]
        table[b] = torch.cat([own, pad])
        if n:
            own_d = own.to(cache.device)
            flat = cache[own_d].reshape(n * page_size, *row_shape)
            flat[:s] = randn((s, *row_shape), torch.float32, gen, device, scale=scale)
            cache[own_d] = flat.reshape(n, page_size, *row_shape)
    return cache.to(dtype), table.to(torch.int32).to(device)


def gather_paged_rows(cache: torch.Tensor, page_table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` logical rows of one request from a paged cache."""
    page_size = cache.shape[1]
    idx = torch.arange(n, device=cache.device)
    pages = page_table_row.long()[idx // page_size]
    return cache[pages, idx % page_size]
