"""Where a CuTe mla_decode CTA's time goes: per-CTA timestamps (one device call, ~1-2 min).

    source .device/setup.sh && PYTHONUNBUFFERED=1 python3 bench/gpu_cute_stamps.py --out $OUT \
        --rows "16,1,128,4096;1,1,128,65536"

For each row the default variant's kernel is compiled a second time with the timing probe on
(``MlaDecodeSplitKV.stamp_addr``: each CTA writes (%globaltimer, %clock64) at named points, see
``mla_decode_kernel.STAMP_*``), and two one-thread kernels stamp the stream just before the split
kernel and just after the combine. Each timed call follows an L2 flush, as the benchmarks time
it. Per row: the probed and the plain build's time (CUDA-graph replay; the probe's cost), the
launch gap (stream stamp -> first CTA entry), the spread of CTA starts and ends, the median /
p90 of each phase per CTA (clock cycles, converted to ns with the SM clock measured over the
run), and what follows the split kernel (the combine, the stream's tail). For the see-saw kernel
also, per CTA, how long each math warpgroup waited over the KV loop for its KV columns to land,
for the other warpgroup (the P hand-over barriers) and for its own MMAs, and how long the
producer warp waited for columns to be freed (``mla_decode_kernel.STAMP_WAITS``). Everything
goes to $OUT/stamps.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
import torch  # noqa: E402
from gpu_cute_mla_decode import bench_inputs, log  # noqa: E402
from tokenspeed_kernels_blackwell.mla_decode_kernel import _store_stamp  # noqa: E402

from tokenspeed_core.bench import time_calls  # noqa: E402

MAX_CTAS = 1 << 16
REPS = 7  # probed calls per row (the median span is reported)


@cute.kernel
def _stream_stamp(mRec: cute.Tensor, slot: cutlass.Constexpr):
    _store_stamp(mRec.iterator.toint() + slot * 16)


@cute.jit
def _launch_stream_stamp(mRec: cute.Tensor, slot: cutlass.Constexpr, stream):
    _stream_stamp(mRec, slot).launch(grid=[1, 1, 1], block=[1, 1, 1], stream=stream)


def stream_stamp_kernel(slot: int):
    """A compiled 1-thread kernel that stamps (%globaltimer, %clock64) into row ``slot`` of the
    (2, 2) int64 tensor it is called with."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    rec = make_fake_compact_tensor(cutlass.Int64, (2, 2), stride_order=(1, 0), assumed_align=16)
    return cute.compile(_launch_stream_stamp, rec, slot, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options="--enable-tvm-ffi")


_probed: dict[tuple, object] = {}


def probed_launcher(a, stamp_addr: int):
    """(call, splits): the default variant's kernel for ``a``, compiled (once per shape class) with
    the probe writing to ``stamp_addr``, launched as ``mla_decode`` launches it."""
    from tokenspeed_kernels_blackwell import mla_decode as cm
    from tokenspeed_kernels_blackwell import mla_decode_kernel as mk

    q, kv = a["q"], a["kv_cache"]
    batch, q_len, heads, d = q.shape
    variant = cm.resolve_variant("sm_90a", None)
    key = ("sm_90a", q.dtype, heads, q_len, d, 512, kv.shape[1], variant, kv.dtype)
    if key not in _probed:
        mk.MlaDecodeSplitKV.stamp_addr = stamp_addr
        try:
            _probed[key] = cm._compile(*key)
        finally:
            mk.MlaDecodeSplitKV.stamp_addr = 0
    fn = _probed[key]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    m = heads * q_len
    splits = cm.split_count(variant, batch, m, a["page_table"].shape[1] * kv.shape[1], sms, kv.dtype)
    o_part, lse_part = cm.partial_buffers(batch, splits, m, 512, q.dtype, q.device, variant)
    args = (q.view(batch, m, d), kv.view(-1, d), a["page_table"], a["cache_seqlens"], o_part, lse_part,
            a["out"].view(batch, m, 512), a["lse"].view(batch, m),
            cm.positive_scale_log2(q, a["softmax_scale"])[1], 1.0)
    return (lambda: fn(*args)), splits


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))] if s else float("nan")


def analyse(rec, stream, n_ctas):
    """Summary of one probed call: ``rec`` (n_ctas, STAMP_SLOTS, 2) int64, ``stream`` (2, 2)."""
    from tokenspeed_kernels_blackwell import mla_decode_kernel as mk

    rec = rec[:n_ctas]
    gt, ck = rec[:, :, 0].double(), rec[:, :, 1].double()
    e, x = mk.STAMP_ENTRY, mk.STAMP_EXIT
    last = x if bool((rec[:, x, 0] != 0).all()) else mk.STAMP_STORED
    # SM clock: ns per cycle over every CTA's life (same SM for all of a CTA's stamps)
    ns_per_cycle = float((gt[:, last] - gt[:, e]).sum() / (ck[:, last] - ck[:, e]).sum())
    t0 = float(gt[:, e].min())
    starts = (gt[:, e] - t0) / 1e3
    ends = (gt[:, last] - t0) / 1e3
    out = dict(ctas=n_ctas, sm_clock_mhz=round(1e3 / ns_per_cycle, 1),
               launch_gap_us=round((t0 - float(stream[0, 0])) / 1e3, 2),
               span_us=round(float(ends.max()), 2),
               start_us=dict(p50=round(pct(starts.tolist(), 0.5), 2), max=round(float(starts.max()), 2)),
               end_us=dict(min=round(float(ends.min()), 2), p50=round(pct(ends.tolist(), 0.5), 2),
                           max=round(float(ends.max()), 2)),
               after_split_us=round((float(stream[1, 0]) - t0) / 1e3 - float(ends.max()), 2),
               ctas_per_sm_max=int(torch.bincount(rec[:, mk.STAMP_SMID, 0] & 0xFFFFFFFF).max()))
    phases = {}
    order = [s for s in (mk.STAMP_ENTRY, mk.STAMP_SETUP, mk.STAMP_Q, mk.STAMP_FIRST_S, mk.STAMP_LOOP_END,
                         mk.STAMP_EPI_SYNC, mk.STAMP_STORED, mk.STAMP_EXIT) if bool((rec[:, s, 0] != 0).all())]
    for a, b in zip(order, order[1:], strict=False):
        d = ((ck[:, b] - ck[:, a]) * ns_per_cycle / 1e3).tolist()
        phases[f"{mk.STAMP_NAMES[a]} -> {mk.STAMP_NAMES[b]}"] = dict(p50=round(pct(d, 0.5), 2),
                                                                    p90=round(pct(d, 0.9), 2))
    for a, b in ((mk.STAMP_SETUP, mk.STAMP_PRODUCER_START), (mk.STAMP_PRODUCER_START, mk.STAMP_PRODUCER_DONE)):
        if bool((rec[:, b, 0] != 0).all()):
            d = ((ck[:, b] - ck[:, a]) * ns_per_cycle / 1e3).tolist()
            phases[f"{mk.STAMP_NAMES[a]} -> {mk.STAMP_NAMES[b]}"] = dict(p50=round(pct(d, 0.5), 2),
                                                                        p90=round(pct(d, 0.9), 2))
    out["phases_us"] = phases
    # the see-saw kernel's wait records: cycles spent in each kind of wait over the KV loop
    waits = {}
    for k, who in enumerate(("WG0", "WG1", "producer")):
        slot = mk.STAMP_WAITS + k
        if not bool((rec[:, slot] != 0).any()):
            continue
        u32 = torch.stack([rec[:, slot, 0] & 0xFFFFFFFF, (rec[:, slot, 0] >> 32) & 0xFFFFFFFF,
                           rec[:, slot, 1] & 0xFFFFFFFF], dim=1).double()
        kinds = mk.WAIT_NAMES if who != "producer" else {mk.WAIT_FREED: "KV freed"}
        for kind, name in kinds.items():
            d = (u32[:, kind] * ns_per_cycle / 1e3).tolist()
            waits[f"{who} waits for {name}"] = dict(p50=round(pct(d, 0.5), 2), p90=round(pct(d, 0.9), 2))
    if waits:
        out["loop_waits_us"] = waits
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", default="16,1,128,4096;16,1,128,16384;64,1,128,4096;1,1,128,65536;16,4,128,4096;"
                    "16,4,16,4096;64,4,16,4096")
    args = ap.parse_args()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    from tokenspeed_kernels_blackwell import mla_decode as cm
    from tokenspeed_kernels_blackwell import mla_decode_kernel as mk

    rec = torch.zeros((MAX_CTAS, mk.STAMP_SLOTS, 2), dtype=torch.int64, device=device)
    stream_rec = torch.zeros((2, 2), dtype=torch.int64, device=device)
    before_k, after_k = stream_stamp_kernel(0), stream_stamp_kernel(1)

    def before():
        before_k(stream_rec)

    def after():
        after_k(stream_rec)

    flush = torch.empty(256 << 18, dtype=torch.int32, device=device)  # 256 MB, > L2
    results = []
    for r in args.rows.split(";"):
        b, ql, h, s = (int(x) for x in r.split(","))
        a = bench_inputs(dict(B=b, q_len=ql, H=h, seqlen=s, page_size=64, dtype=torch.bfloat16), device)
        call, splits = probed_launcher(a, rec.data_ptr())
        m_blocks = -(-h * ql // 64)
        n_ctas = m_blocks * splits * b
        plain_us = time_calls([lambda a=a: cm.mla_decode(**a)], device, cuda_graph=True).median_us
        probed_us = time_calls([lambda call=call: (before(), call(), after())], device, cuda_graph=True).median_us
        runs = []
        for _ in range(REPS):
            rec[:n_ctas].zero_()
            flush.zero_()
            before()
            call()
            after()
            torch.cuda.synchronize()
            runs.append(analyse(rec.cpu(), stream_rec.cpu(), n_ctas))
        runs.sort(key=lambda x: x["span_us"])
        row = dict(B=b, q_len=ql, H=h, s_k=s, splits=splits, m_blocks=m_blocks, card=card,
                   plain_us=round(plain_us, 1), probed_us=round(probed_us, 1), median_run=runs[len(runs) // 2],
                   spans_us=[x["span_us"] for x in runs])
        results.append(row)
        log(json.dumps(row))
        a = call = None
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "stamps.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{card}: per-CTA phases, µs (median CTA of the median call; p90 in brackets)")
    for row in results:
        mr = row["median_run"]
        print(f"B {row['B']} q {row['q_len']} H {row['H']} s_k {row['s_k']}: {mr['ctas']} CTAs "
              f"({row['splits']} splits), plain {row['plain_us']} / probed {row['probed_us']} µs; "
              f"launch gap {mr['launch_gap_us']}, starts p50/max {mr['start_us']['p50']}/{mr['start_us']['max']}, "
              f"ends min/p50/max {mr['end_us']['min']}/{mr['end_us']['p50']}/{mr['end_us']['max']}, "
              f"after split {mr['after_split_us']}, SM clock {mr['sm_clock_mhz']} MHz")
        for k, v in mr["phases_us"].items():
            print(f"    {k:40s} {v['p50']:8.2f} [{v['p90']:.2f}]")
        for k, v in mr.get("loop_waits_us", {}).items():
            print(f"    in the loop, {k:26s} {v['p50']:8.2f} [{v['p90']:.2f}]")


if __name__ == "__main__":
    main()
