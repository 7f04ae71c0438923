"""Scheduler benchmarks (CPU). `python -m tokenspeed.sim.bench [--traces DIR] [--json]`.

Numbers are recorded in docs/perf/scheduler.md. This is a benchmark, never a timed test.
Each case builds its own scheduler; times are wall clock (perf_counter_ns) around the Python API,
so they include the cffi call and the numpy plan copy, i.e. what the execution plane pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from tokenspeed.scheduler import Scheduler


def _median_us(samples_ns: list[int]) -> float:
    return round(statistics.median(samples_ns) / 1e3, 2)


def _decoding(sched: Scheduler, n: int, prompt_len: int, rng, max_new: int = 100_000) -> None:
    """Submits n requests and steps until all of them decode."""
    for _ in range(n):
        sched.submit(rng.integers(0, 50_000, size=prompt_len, dtype=np.int32), max_new_tokens=max_new)
    while True:
        plan = sched.step()
        sched.commit(plan, np.full(int(plan.sample.sum()), 1, dtype=np.int32))
        if plan.num_entries == n and int(plan.sample.sum()) == n and len(plan.new_rows) == 0:
            return


def bench_decode_step(num_decodes: int = 1024, iters: int = 2000, prompt_len: int = 200) -> dict:
    """step() + commit() with num_decodes running decodes (one sampled token each)."""
    rng = np.random.default_rng(0)
    sched = Scheduler(page_size=64, num_pages=num_decodes * 64, max_batch_tokens=max(8192, num_decodes),
                      max_batch_size=num_decodes)
    _decoding(sched, num_decodes, prompt_len, rng)
    tokens = np.full(num_decodes, 1, dtype=np.int32)
    samples, step_only, appends = [], [], 0
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        plan = sched.step()
        t1 = time.perf_counter_ns()
        sched.commit(plan, tokens)
        t2 = time.perf_counter_ns()
        samples.append(t2 - t0)
        step_only.append(t1 - t0)
        appends += len(plan.append_pages)
    assert plan.num_entries == num_decodes
    return {"num_decodes": num_decodes, "step_commit_us_median": _median_us(samples),
            "step_us_median": _median_us(step_only),
            "step_commit_us_p90": round(float(np.percentile(samples, 90)) / 1e3, 2),
            "page_appends_per_step": round(appends / iters, 2), "iters": iters}


def bench_blocked_queue(num_waiting: int = 40, prompt_len: int = 32_768, num_decodes: int = 64,
                        iters: int = 2000) -> dict:
    """Step cost with num_waiting un-admittable prompts queued, against the same without them."""
    rng = np.random.default_rng(1)
    out = {}
    for label, waiting in (("without_queue", 0), ("with_queue", num_waiting)):
        # Every page-table row is taken by a decode and the pool has room for the decodes' growth
        # only: a waiting 32K prompt fits neither, so the queue stays blocked for the whole run.
        pages = num_decodes * (-(-(200 + iters + 2) // 64)) + 1
        sched = Scheduler(page_size=64, num_pages=pages, max_batch_tokens=8192, max_batch_size=num_decodes)
        _decoding(sched, num_decodes, 200, rng, max_new=10_000)
        for _ in range(waiting):
            sched.submit(rng.integers(0, 50_000, size=prompt_len, dtype=np.int32), max_new_tokens=16)
        tokens = np.full(num_decodes, 1, dtype=np.int32)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            plan = sched.step()
            sched.commit(plan, tokens[: int(plan.sample.sum())])
            samples.append(time.perf_counter_ns() - t0)
        st = sched.stats()
        assert st.num_waiting == waiting, "the queue was supposed to stay blocked"
        out[label] = _median_us(samples)
    out["per_waiting_request_ns"] = round((out["with_queue"] - out["without_queue"]) * 1e3 / num_waiting, 1)
    # Second variant, blocked by KV instead of rows: 1024-token pages, one per decode, and a pool
    # of exactly one page per decode, so no page is free or evictable for the whole run.
    for label, waiting in (("kv_blocked_without_queue", 0), ("kv_blocked_with_queue", num_waiting)):
        sched = Scheduler(page_size=1024, num_pages=num_decodes, max_batch_tokens=8192,
                          max_batch_size=num_decodes + num_waiting)
        _decoding(sched, num_decodes, 100, rng, max_new=900)
        for _ in range(waiting):
            sched.submit(rng.integers(0, 50_000, size=prompt_len, dtype=np.int32), max_new_tokens=16)
        tokens = np.full(num_decodes, 1, dtype=np.int32)
        samples = []
        for _ in range(800):
            t0 = time.perf_counter_ns()
            plan = sched.step()
            sched.commit(plan, tokens[: int(plan.sample.sum())])
            samples.append(time.perf_counter_ns() - t0)
        st = sched.stats()
        assert st.num_waiting == waiting and st.free_pages == 0 and st.preemptions == 0
        out[label] = _median_us(samples)
    out["kv_blocked_per_waiting_request_ns"] = round(
        (out["kv_blocked_with_queue"] - out["kv_blocked_without_queue"]) * 1e3 / num_waiting, 1)
    out.update(num_waiting=num_waiting, prompt_len=prompt_len, num_decodes=num_decodes)
    return out


def bench_cached_admission(prompt_len: int = 100_000, cached: int = 99_000, page_size: int = 64,
                           iters: int = 200) -> dict:
    """Admission (match + allocate + plan) of a prompt whose first `cached` tokens are cached."""
    rng = np.random.default_rng(2)
    sched = Scheduler(page_size=page_size, num_pages=2 * prompt_len // page_size + 64, max_batch_tokens=8192,
                      max_batch_size=8)
    base = rng.integers(0, 50_000, size=prompt_len, dtype=np.int32)
    first = base.copy()
    first[cached:] = rng.integers(50_000, 60_000, size=prompt_len - cached, dtype=np.int32)
    rid = sched.submit(first[: cached + 1], max_new_tokens=1)  # warm the cache with the prefix
    while sched.stats().num_running or sched.stats().num_waiting:
        plan = sched.step()
        sched.commit(plan, np.full(int(plan.sample.sum()), 3, dtype=np.int32))
    del rid
    step_ns, match_ns, hit = [], [], 0
    for _ in range(iters):
        rid = sched.submit(base, max_new_tokens=1)
        t0 = time.perf_counter_ns()
        plan = sched.step()
        step_ns.append(time.perf_counter_ns() - t0)
        hit = int(plan.context_lens[0])
        sched.abort(rid)  # before commit: the new pages never get cached, the next round is equal
        sched.commit(plan, np.full(int(plan.sample.sum()), 3, dtype=np.int32))
        t0 = time.perf_counter_ns()
        sched.cached_prefix_len(base)
        match_ns.append(time.perf_counter_ns() - t0)
    return {"prompt_len": prompt_len, "cached_tokens_hit": hit, "page_size": page_size,
            "admission_step_us_median": _median_us(step_ns), "match_only_us_median": _median_us(match_ns),
            "iters": iters}


def bench_replay(traces_dir: str, sessions: int = 8) -> dict:
    """The same agentic replay through the C++ scheduler and the Python reference."""
    from tokenspeed.sim.cli import load_reference_scheduler
    from tokenspeed.sim.simulator import Simulator
    from tokenspeed.sim.traces import load_agentic

    out = {"sessions": sessions}
    for label, cls in (("cpp", Scheduler), ("reference", load_reference_scheduler())):
        workload = load_agentic(os.path.join(traces_dir, "agentic"), sessions)
        need = sum(max(t.prompt_len + t.output_len for t in s.turns) for s in workload)
        sched = cls(page_size=64, num_pages=int(need * 1.1) // 64 + 1024, max_batch_tokens=8192, max_batch_size=256)
        res = Simulator(sched).run_sessions(workload)
        out[label] = {"scheduler_seconds": res.scheduler_seconds, "steps": res.steps,
                      "step_us": res.step_us, "prefix_hit_rate": round(res.prefix_hit_rate, 4)}
    out["speedup"] = round(out["reference"]["scheduler_seconds"] / out["cpp"]["scheduler_seconds"], 1)
    return out


def bench_replay_mooncake(traces_dir: str, limit: int = 2000) -> dict:
    """The same Mooncake open-loop replay (first `limit` requests) through both schedulers."""
    from tokenspeed.sim.cli import MOONCAKE_DEFAULT_KV_TOKENS, load_reference_scheduler
    from tokenspeed.sim.simulator import Simulator
    from tokenspeed.sim.traces import load_mooncake

    out = {"requests": limit}
    for label, cls in (("cpp", Scheduler), ("reference", load_reference_scheduler())):
        workload = load_mooncake(os.path.join(traces_dir, "mooncake_conversation_trace.jsonl.gz"), limit)
        sched = cls(page_size=64, num_pages=MOONCAKE_DEFAULT_KV_TOKENS // 64, max_batch_tokens=8192,
                    max_batch_size=256)
        res = Simulator(sched).run_open_loop(workload)
        out[label] = {"scheduler_seconds": res.scheduler_seconds, "steps": res.steps,
                      "step_us": res.step_us, "prefix_hit_rate": round(res.prefix_hit_rate, 4)}
    out["speedup"] = round(out["reference"]["scheduler_seconds"] / out["cpp"]["scheduler_seconds"], 1)
    return out


def bench_prefix_reuse(traces_dir: str, sessions: int | None = None) -> dict:
    """Per agent turn: cached tokens at admission against the true reusable prefix (the longest
    common prefix of this prompt with the previous turn's prompt + reply)."""
    from tokenspeed.sim.simulator import Simulator
    from tokenspeed.sim.traces import load_agentic

    workload = load_agentic(os.path.join(traces_dir, "agentic"), sessions)
    need = sum(max(t.prompt_len + t.output_len for t in s.turns) for s in workload)
    sched = Scheduler(page_size=64, num_pages=int(need * 1.1) // 64 + 1024, max_batch_tokens=8192, max_batch_size=256)
    sim = Simulator(sched)
    res = sim.run_sessions(workload)
    turns = ok = 0
    worst_miss = 0
    for s, i, hit in sim.turn_hits:
        if i == 0:
            continue
        sess = workload[s]
        prev = sess.prompt_tokens(i - 1)
        prev_full = np.concatenate([prev, sess.prompt_tokens(i)[len(prev):len(prev) + sess.turns[i - 1].output_len]])
        cur = sess.prompt_tokens(i)
        n = min(len(prev_full), len(cur) - 1)  # the last token is always recomputed
        eq = prev_full[:n] == cur[:n]
        lcp = n if eq.all() else int(np.argmin(eq))
        turns += 1
        miss = lcp - hit
        worst_miss = max(worst_miss, miss)
        ok += miss <= 64
    return {"sessions": len(workload), "turns_checked": turns, "turns_missing_at_most_one_page": ok,
            "worst_miss_tokens": worst_miss, "prefix_hit_rate": round(res.prefix_hit_rate, 4),
            "preemptions": res.preemptions}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenspeed.sim.bench", description=__doc__)
    p.add_argument("--traces", default=os.path.join("..", "shared", "traces"), help="shared/traces folder")
    p.add_argument("--replay-sessions", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None,
                   help="subset of: decode blocked admission replay replay_mooncake reuse")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cases = {
        "decode": bench_decode_step,
        "blocked": bench_blocked_queue,
        "admission": bench_cached_admission,
        "replay": lambda: bench_replay(args.traces, args.replay_sessions),
        "replay_mooncake": lambda: bench_replay_mooncake(args.traces),
        "reuse": lambda: bench_prefix_reuse(args.traces),
    }
    results = {"machine": machine()}
    for name, fn in cases.items():
        if args.only and name not in args.only:
            continue
        if name in ("replay", "replay_mooncake", "reuse") and not os.path.isdir(os.path.join(args.traces, "agentic")):
            results[name] = "skipped: traces not found"
            continue
        results[name] = fn()
        if not args.json:
            print(name, json.dumps(results[name]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
