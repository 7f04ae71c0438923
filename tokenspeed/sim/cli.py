"""`tokenspeed sim TRACE_DIR_OR_FILE [--kv-tokens N] [--json]`: replay a trace through the scheduler."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from tokenspeed.sim.simulator import CostModel, SimResult, Simulator
from tokenspeed.sim.traces import detect_kind, load_agentic, load_mooncake

MOONCAKE_DEFAULT_KV_TOKENS = 16 * 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="agentic/ folder, one trace_*.json(.gz), or mooncake *.jsonl(.gz)")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="KV pool size in tokens (default: enough for the trace to fit)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--draft-slots", type=int, default=0, help="speculative slots per decode")
    parser.add_argument("--think-scale", type=float, default=0.1,
                        help="agentic: multiply think times by this (compression)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="mooncake: multiply arrival times")
    parser.add_argument("--limit", type=int, default=None, help="first N sessions / requests only")
    parser.add_argument("--backend", choices=("cpp", "reference"), default="cpp",
                        help="reference: the pure-Python scheduler in tests/scheduler (dev checkouts only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def load_reference_scheduler():
    """The pure-Python reference lives with the tests; found relative to a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tests", "scheduler", "reference_scheduler.py")
    if not os.path.exists(path):
        raise SystemExit(f"--backend reference needs a source checkout ({path} not found)")
    spec = importlib.util.spec_from_file_location("tokenspeed_reference_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ReferenceScheduler


def simulate(args: argparse.Namespace) -> SimResult:
    kind = detect_kind(args.trace)
    if kind == "agentic":
        workload = load_agentic(args.trace, args.limit)
        need = sum(max(t.prompt_len + t.output_len for t in s.turns) for s in workload)
        default_kv = int(need * 1.1) + args.page_size * args.max_batch_size * (2 + args.draft_slots)
    else:
        workload = load_mooncake(args.trace, args.limit)
        default_kv = MOONCAKE_DEFAULT_KV_TOKENS
    kv_tokens = args.kv_tokens or default_kv
    if args.backend == "cpp":
        from tokenspeed.scheduler import Scheduler
    else:
        Scheduler = load_reference_scheduler()  # noqa: N806
    sched = Scheduler(page_size=args.page_size, num_pages=max(kv_tokens // args.page_size, 1),
                      max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                      num_draft_slots=args.draft_slots)
    sim = Simulator(sched, CostModel(), think_scale=args.think_scale, seed=args.seed)
    name = os.path.basename(args.trace.rstrip("/"))
    if kind == "agentic":
        return sim.run_sessions(workload, name)
    return sim.run_open_loop(workload, name, time_scale=args.time_scale)


def run(args: argparse.Namespace) -> int:
    result = simulate(args)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(f"trace               {result.trace} ({args.backend} scheduler)")
    print(f"requests            {result.finished}/{result.requests} finished"
          + (f", {result.rejected} rejected (larger than the KV pool)" if result.rejected else ""))
    print(f"prefix_hit_rate     {result.prefix_hit_rate:.4f}  ({result.cached_prompt_tokens:,} of {result.prompt_tokens:,} prompt tokens cached)")
    print(f"preemptions         {result.preemptions}")
    print(f"steps               {result.steps}")
    print(f"step_us (step+commit) {result.step_us}")
    print(f"ttft_s (simulated)  {result.ttft_s}")
    print(f"simulated time      {result.sim_seconds:.1f} s; wall {result.wall_seconds:.1f} s "
          f"(scheduler {result.scheduler_seconds:.2f} s)")
    print(f"kv pool             {result.kv_tokens:,} tokens, page size {result.page_size}")
    return 0
