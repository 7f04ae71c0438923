"""Example TokenSpeed kernel plugin.

Registers one implementation: ``mla_decode`` computed for the whole batch at once (requests
padded to the longest, pages gathered with one index operation) instead of the reference's loop
over requests. It declares what it supports beside the kernel, stands in the PLUGIN priority band
so it wins over the built-in backends wherever it applies, and leaves the rest to them.
"""

from __future__ import annotations

import torch

import tokenspeed_core
from tokenspeed_core import Priority, Registry, Signature

BACKEND = "example"


def supports_mla_decode(sig: Signature) -> str | None:
    """Why this kernel cannot run a call (None: it can). Sees only the selection signature."""
    if sig.dtype("kv_cache") == torch.float8_e4m3fn:
        return "fp8 caches are not implemented"
    if sig.dim("PS") < 16:
        return f"page size {sig.dim('PS')} < 16 (gathering tiny pages this way is slower than the reference)"
    return None


def mla_decode_batched(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale,
                       head_dim_v=512, kv_scale=1.0):
    """All requests at once: gather [B, max_len, D], mask by length and causality, one softmax."""
    B, Q, H, D = q.shape
    if B == 0:
        return
    page_size = kv_cache.shape[1]
    max_len = page_table.shape[1] * page_size
    pos = torch.arange(max_len, device=q.device)
    rows = kv_cache[page_table.long()[:, pos // page_size], pos % page_size]  # [B, max_len, D]
    acc = torch.float32 if q.dtype != torch.float64 else torch.float64
    rows = rows.to(acc) * kv_scale
    scores = torch.einsum("bqhd,bnd->bqhn", q.to(acc), rows) * softmax_scale
    lens = cache_seqlens.long()
    query_pos = lens[:, None] - Q + torch.arange(Q, device=q.device)[None, :]  # [B, Q]
    visible = pos[None, None, :] <= query_pos[:, :, None]  # [B, Q, max_len]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse_ = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse_[..., None])
    out.copy_(torch.einsum("bqhn,bnd->bqhd", probs, rows[..., :head_dim_v]))
    lse.copy_(lse_)


@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry: Registry) -> None:
    registry.register(
        "mla_decode", mla_decode_batched, backend=BACKEND, devices=("cpu", "cuda"),
        supports=supports_mla_decode, priority=Priority.PLUGIN,
        doc="batched torch mla_decode (padded gather, one softmax)",
    )
