"""Triton ``moe``: routed experts as two grouped GEMMs over expert-sorted (token, slot) rows.

One call, no host sync (so it can be captured in a CUDA graph):

1. routing: the op's grouped top-k (one program per token, ``_moe_routing.route_kernel``; the
   op's torch ``route`` for float64 logits) gives each token ``top_k`` (expert, weight) slots,
   then the shared experts; slot ``i`` of token ``t`` is row ``t * slots + i``.
2. align: the rows sorted by expert, each expert's run padded to BLOCK_M, so that a BLOCK_M
   block of sorted rows belongs to one expert (``sorted_rows``; padding holds the row count,
   read as "no row"; ``block_expert``: -1 past the last block). One program
   (``_moe_routing.align_kernel``) up to 2048 rows; beyond, torch ops with sizes fixed by the
   shapes (scatter-add counts, a stable argsort, cumsum, searchsorted): no ``.item()`` either way.
3. up: per (row block, Dff tile) ``[g | u] = x[token] @ w13[e]^T``, ``h = silu(g) * u``,
   stored per row (x's dtype, as the down GEMM's operand).
4. down: per (row block, Dm tile) ``y = h @ w2[e]^T * weight``, atomically added (float32) into
   the token's accumulator.

The shared experts are experts E, E + 1, ... of weight 1 that every token is routed to, in the
same two launches as the routed ones (their own launches when their width differs); the float32
accumulator is cast to ``out`` once. Weights are addressed through their strides
(never copied). This is vLLM's fused-MoE structure (align, then grouped GEMMs); the gate and up
halves are two accumulators of one program, so silu * mul is fused in its epilogue.

Tile sizes follow the rows per expert (decode: a handful of tokens per expert, 16-row blocks,
narrow enough to fill the GPU; prefill: 128 x 128); chosen from H100 sweeps in
docs/perf/triton-moe.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_core import Priority
from tokenspeed_core.ops.moe import route

from . import _moe_routing as routing
from .plugin import interpreting, sm_count


@triton.jit
def expert_weights(w_ptr, ws_ptr, e, num_routed, stride_we, stride_wse):
    """Base of expert ``e``'s weights: routed ``w[e]``, or shared ``ws[e - num_routed]``."""
    if e < num_routed:
        base = w_ptr + e.to(tl.int64) * stride_we
    else:
        base = ws_ptr + (e - num_routed).to(tl.int64) * stride_wse
    return base


@triton.jit
def moe_up_kernel(x_ptr, w_ptr, ws_ptr, h_ptr, sorted_rows_ptr, block_expert_ptr, top_k, Dm, F, num_rows,
                  num_routed, stride_xt, stride_we, stride_wse, stride_wn, stride_wk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h[row, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, F + n]) for a block of one expert's rows.

    Experts from ``num_routed`` on are shared experts, ``ws[e - num_routed]`` (same inner strides)."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # past the last expert's padded run
        return
    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    tok = (rows // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    w_e = expert_weights(w_ptr, ws_ptr, e, num_routed, stride_we, stride_wse)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Dm, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Dm
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_offs = offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
        wg = tl.load(w_e + w_offs, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]: gate rows
        wu = tl.load(w_e + F * stride_wn + w_offs, mask=w_mask, other=0.0)  # up rows
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(h_ptr, w_ptr, ws_ptr, acc_ptr, weight_ptr, sorted_rows_ptr, block_expert_ptr, top_k, Dm, F,
                    num_rows, num_routed, stride_we, stride_wse, stride_wn, stride_wk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc[tok, n] += weight[row] * (h[row] . w[e, n]) for a block of one expert's rows."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Dm
    w_e = expert_weights(w_ptr, ws_ptr, e, num_routed, stride_we, stride_wse)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_e + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    tok = (rows // top_k).to(tl.int64)
    # relaxed: the adds need no order among themselves, and the next launch sees them all
    tl.atomic_add(acc_ptr + tok[:, None] * Dm + offs_n[None, :], acc * weight[:, None],
                  mask=row_ok[:, None] & n_ok[None, :], sem="relaxed")


def tile_config(rows: int, experts: int, n_up: int, n_down: int, sms: int) -> dict:
    """Block sizes for ``rows`` (token, slot) rows over ``experts`` experts; ``n_up`` / ``n_down``
    are the output widths of the two GEMMs (Dff and Dm), ``sms`` the GPU's SM count.

    Few rows per expert (decode) make both GEMMs weight-streaming: the time is the experts'
    bytes over the bandwidth the programs can pull, so the output tiles narrow until each launch
    has at least two programs per SM (T = 1 on DeepSeek-V3: 9 expert blocks x 2048 / 64 = 288 up
    programs, not 9 x 16) and long K steps keep bytes in flight. Many rows per expert (prefill)
    get wide GEMM tiles."""
    if interpreting():  # small tiles: test shapes cross several blocks of each kind
        return dict(BLOCK_M=16, BLOCK_N_UP=32, BLOCK_N_DOWN=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return gpu_tiles(rows, experts, n_up, n_down, sms)


def gpu_tiles(rows: int, experts: int, n_up: int, n_down: int, sms: int) -> dict:
    """``tile_config`` on a GPU (also what the compile test builds)."""
    per_expert = rows / max(experts, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    # row blocks that can hold rows: one per touched expert while experts have under a block each
    blocks = min(experts, rows) if per_expert <= block_m else -(-rows // block_m)

    def block_n(n: int) -> int:
        for bn in (64, 32):
            if blocks * -(-n // bn) >= 2 * sms:
                return bn
        return 16

    if block_m == 16:
        # K steps of 128 (256 contiguous bytes of each weight row) at N <= 64: 6% faster than
        # N 128 / K 64 at T 8 and 64 (H100, docs/perf/triton-moe.md); 4 stages of the up kernel's
        # x, gate and up tiles are 108 KB of smem at N 64
        return dict(BLOCK_M=16, BLOCK_N_UP=block_n(n_up), BLOCK_N_DOWN=block_n(n_down), BLOCK_K=128,
                    num_warps=4, num_stages=4)
    if per_expert > 96:  # prefill chunks: 128 x 128 tiles, 10-12% faster than 64 x 128 at T 4096 / 16384
        return dict(BLOCK_M=128, BLOCK_N_UP=128, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N_UP=128, BLOCK_N_DOWN=128, BLOCK_K=64,
                num_warps=4 if block_m < 64 else 8, num_stages=3)


def padded_rows(rows: int, num_experts: int, block_m: int) -> int:
    """P, the padded length from the shapes alone: every row, plus up to block_m - 1 padding rows
    for each expert that can be non-empty (at most min(E, rows) of them)."""
    return -(-(rows + min(num_experts, rows) * (block_m - 1)) // block_m) * block_m


def align_rows(ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_rows [P] int32, block_expert [P / block_m] int32) for expert ids [T, top_k]: the rows
    grouped by expert (token order within one), each expert's run padded to block_m (padding
    holds the row count), and each block's expert (-1 past the last run). One kernel
    (``_moe_routing.align_kernel``) up to ``FUSED_MAX_ROWS`` rows, torch ops beyond."""
    rows = ids.numel()
    if rows <= routing.FUSED_MAX_ROWS and num_experts <= routing.FUSED_MAX_EXPERTS:
        P = padded_rows(rows, num_experts, block_m)
        sorted_rows = torch.empty((P,), dtype=torch.int32, device=ids.device)
        block_expert = torch.empty((P // block_m,), dtype=torch.int32, device=ids.device)
        routing.align_kernel[(1,)](ids.reshape(-1).to(torch.int32), sorted_rows, block_expert, rows, num_experts,
                                   P, BLOCK_M=block_m, ROWS=triton.next_power_of_2(rows), EXPERTS=triton.next_power_of_2(num_experts + 1), CHUNK=64,
                                   num_warps=4)
        return sorted_rows, block_expert
    return align_rows_torch(ids, num_experts, block_m)


def align_rows_torch(ids: torch.Tensor, num_experts: int, block_m: int):
    """``align_rows`` in torch ops with sizes fixed by the shapes (scatter-add counts, a stable
    argsort, cumsum, searchsorted): no host sync, any size."""
    rows = ids.numel()
    flat = ids.reshape(-1).long()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, in token order within one
    expert_of = flat[order]
    rank = torch.arange(rows, device=dev) - (torch.cumsum(counts, 0) - counts)[expert_of]
    P = padded_rows(rows, num_experts, block_m)
    sorted_rows = torch.full((P,), rows, dtype=torch.int32, device=dev)
    sorted_rows[(pad_end - padded)[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, P, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_rows, block_expert


def _experts(x, ids, weights, w13, w2, acc, ws13=None, ws2=None):
    """acc[t] += sum_i weights[t, i] * expert(ids[t, i], x[t]); ids below E = w13.shape[0] name
    routed experts (w13 / w2), ids E + j the shared expert j (ws13 / ws2, same shapes and inner
    strides), so routed and shared experts run in one launch of each kernel."""
    T, top_k = ids.shape
    E, F2, Dm = w13.shape
    F = F2 // 2
    if ws13 is None:
        ws13, ws2 = w13, w2
    experts = E + (ws13.shape[0] if ws13 is not w13 else 0)
    rows = T * top_k
    cfg = tile_config(rows, experts, F, Dm, sm_count(x.device))
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    bn_up, bn_down = cfg["BLOCK_N_UP"], cfg["BLOCK_N_DOWN"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sorted_rows, block_expert = align_rows(ids, experts, bm)
    h = torch.empty((rows, F), dtype=x.dtype, device=x.device)
    upcast = interpreting() and x.dtype == torch.bfloat16  # the interpreter's bf16 math is wrong
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    blocks = block_expert.numel()
    moe_up_kernel[(blocks, triton.cdiv(F, bn_up))](
        x, w13, ws13, h, sorted_rows, block_expert, top_k, Dm, F, rows, E, x.stride(0), w13.stride(0),
        ws13.stride(0), *w13.stride()[1:],
        BLOCK_M=bm, BLOCK_N=bn_up, BLOCK_K=bk, UPCAST=upcast, PRECISION=precision, **launch)
    moe_down_kernel[(blocks, triton.cdiv(Dm, bn_down))](
        h, w2, ws2, acc, weights.reshape(-1).float().contiguous(), sorted_rows, block_expert, top_k, Dm, F, rows,
        E, w2.stride(0), ws2.stride(0), *w2.stride()[1:],
        BLOCK_M=bm, BLOCK_N=bn_down, BLOCK_K=bk, UPCAST=upcast, PRECISION=precision, **launch)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape[1:] == b.shape[1:] and a.stride()[1:] == b.stride()[1:]


def route_with_shared(router_logits, bias, top_k, n_group, topk_group, scaling, norm, num_experts, num_shared):
    """(ids [T, top_k + num_shared] int32, weights float32): the op's routing, then the shared
    experts as experts num_experts.. of weight 1. One kernel (``_moe_routing.route_kernel``) for
    float32/16-bit logits, the op's torch ``route`` otherwise (float64)."""
    T, E = router_logits.shape
    dev = router_logits.device
    if router_logits.dtype == torch.float64 or E + num_shared > routing.FUSED_MAX_EXPERTS:
        ids, weights = route(router_logits, bias, top_k, n_group, topk_group, scaling, norm)
        shared = (num_experts + torch.arange(num_shared, device=dev, dtype=ids.dtype)).expand(T, num_shared)
        return (torch.cat([ids, shared], 1).to(torch.int32),
                torch.cat([weights.float(), torch.ones((T, num_shared), dtype=torch.float32, device=dev)], 1))
    k = top_k + num_shared
    ids = torch.empty((T, k), dtype=torch.int32, device=dev)
    weights = torch.empty((T, k), dtype=torch.float32, device=dev)
    group_size = E // n_group
    routing.route_kernel[(T,)](router_logits, bias, ids, weights, router_logits.stride(0), n_group, group_size,
                               topk_group, top_k, num_experts, num_shared, float(scaling), NORM=bool(norm),
                               NG=triton.next_power_of_2(n_group), GS=triton.next_power_of_2(group_size), K=triton.next_power_of_2(k), TORCH_SIGMOID=not interpreting(),
                               num_warps=4)
    return ids, weights


def moe(x, router_logits, e_score_correction_bias, w13, w2, ws13, ws2, out, top_k, n_group, topk_group,
        routed_scaling_factor=1.0, norm_topk_prob=True):
    """moe through Triton; destination passing (see tokenspeed_core.ops.moe)."""
    T, Dm = x.shape
    if T == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    acc = torch.zeros((T, Dm), dtype=torch.float32, device=x.device)
    E, S = w13.shape[0], ws13.shape[0]
    # shared experts as experts E.. of weight 1 in the routed experts' launches where they have
    # the same layout (DeepSeek-V3: at T = 1 one launch over 9 experts instead of 8 + 1, each
    # with its tail); otherwise their own launches
    merged = S and _same_layout(w13, ws13) and _same_layout(w2, ws2)
    ids, weights = route_with_shared(router_logits, e_score_correction_bias.contiguous(), top_k, n_group,
                                     topk_group, routed_scaling_factor, norm_topk_prob, E, S if merged else 0)
    if merged:
        _experts(x, ids, weights, w13, w2, acc, ws13, ws2)
    else:
        _experts(x, ids, weights, w13, w2, acc)
        if S:
            shared = torch.arange(S, device=x.device, dtype=torch.int32).expand(T, S)
            _experts(x, shared, torch.ones((T, S), dtype=torch.float32, device=x.device), ws13, ws2, acc)
    out.copy_(acc)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs, options) for the ahead-of-time GPU compile test, as
    the JIT specialises a DeepSeek layer: contiguous weights (the K stride 1 is a constant) and
    dims and strides that are multiples of 16 (which is what lets the loads become cp.async)."""
    targets = []
    for dt, precision in (("*bf16", "tf32"), ("*fp16", "tf32"), ("*fp32", "ieee")):
        up = {"x_ptr": dt, "w_ptr": dt, "ws_ptr": dt, "h_ptr": dt, "sorted_rows_ptr": "*i32",
              "block_expert_ptr": "*i32", "top_k": "i32", "Dm": "i32", "F": "i32", "num_rows": "i32",
              "num_routed": "i32", "stride_xt": "i64", "stride_we": "i64", "stride_wse": "i64", "stride_wn": "i64",
              "stride_wk": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
              "BLOCK_K": "constexpr", "UPCAST": "constexpr", "PRECISION": "constexpr"}
        down = {"h_ptr": dt, "w_ptr": dt, "ws_ptr": dt, "acc_ptr": "*fp32", "weight_ptr": "*fp32",
                "sorted_rows_ptr": "*i32", "block_expert_ptr": "*i32", "top_k": "i32", "Dm": "i32", "F": "i32",
                "num_rows": "i32", "num_routed": "i32", "stride_we": "i64", "stride_wse": "i64", "stride_wn": "i64",
                "stride_wk": "constexpr", "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "UPCAST": "constexpr", "PRECISION": "constexpr"}
        # DeepSeek-V3 on an H100 (256 routed experts + the shared one): decode (T 1) and a
        # prefill chunk (T 16384); and a lone shared expert of another width at T 1
        for rows, experts, f in ((9, 257, 2048), (1, 1, 2048), (147456, 257, 2048)):
            t = gpu_tiles(rows, experts, f, 7168, 132)
            opts = dict(num_warps=t["num_warps"], num_stages=t["num_stages"],
                        divisible=("Dm", "F", "stride_xt", "stride_we", "stride_wse", "stride_wn"))
            c = dict(BLOCK_M=t["BLOCK_M"], BLOCK_K=t["BLOCK_K"], UPCAST=False, PRECISION=precision, stride_wk=1)
            targets += [(moe_up_kernel, up, dict(c, BLOCK_N=t["BLOCK_N_UP"]), opts),
                        (moe_down_kernel, down, dict(c, BLOCK_N=t["BLOCK_N_DOWN"]), opts)]
    # routing and alignment: DeepSeek-V3 (8 groups of 32, top 8 + 1 shared), and the largest
    # alignment the fused path takes
    route_sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i32", "weights_ptr": "*fp32",
                 "stride_lt": "i32", "n_group": "i32", "group_size": "i32", "topk_group": "i32", "top_k": "i32",
                 "num_experts": "i32", "num_shared": "i32", "scaling": "fp32", "NORM": "constexpr",
                 "NG": "constexpr", "GS": "constexpr", "K": "constexpr", "TORCH_SIGMOID": "constexpr"}
    targets.append((routing.route_kernel, route_sig, dict(NORM=True, NG=8, GS=32, K=16, TORCH_SIGMOID=True),
                    dict(num_warps=4)))
    align_sig = {"ids_ptr": "*i32", "sorted_rows_ptr": "*i32", "block_expert_ptr": "*i32", "num_rows": "i32",
                 "num_experts": "i32", "padded_len": "i32", "BLOCK_M": "constexpr", "ROWS": "constexpr",
                 "EXPERTS": "constexpr", "CHUNK": "constexpr"}
    for rows, experts in ((16, 512), (routing.FUSED_MAX_ROWS, routing.FUSED_MAX_EXPERTS + 1)):
        targets.append((routing.align_kernel, align_sig, dict(BLOCK_M=16, ROWS=rows, EXPERTS=experts, CHUNK=64),
                        dict(num_warps=4)))
    return targets


# False since its first GPU run (H100, docs/perf/triton-moe.md): the full conformance grid passes
# there and it is 10-12x faster than the torch reference on a DeepSeek-V3 layer. While True (a kernel never run on a
# GPU), it ranks just below the reference; backend="triton" still selects it.
NOT_YET_ON_GPU = False


def register(registry, common) -> None:
    kw = common.kwargs()
    status = ""
    if NOT_YET_ON_GPU:
        kw["priority"] = Priority.REFERENCE - 1
        status = "not yet run on a GPU: ranked below the torch reference until verified and timed there"
    registry.register("moe", moe, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton moe: expert-sorted rows, grouped GEMMs (gate/up with fused silu * mul, "
                          "down with the routing weight), shared experts as experts of weight 1",
                      status=status, **kw)
