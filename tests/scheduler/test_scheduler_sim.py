"""The trace simulator on small real traces (skipped when ../shared/traces is absent)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tokenspeed.sim import cli
from tokenspeed.sim.bench import bench_prefix_reuse

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
AGENTIC = TRACES / "agentic"
SMALL_SESSIONS = ["trace_0026.json.gz", "trace_0167.json.gz", "trace_0128.json.gz"]

pytestmark = pytest.mark.skipif(not AGENTIC.is_dir(), reason=f"traces not found at {TRACES}")


def _args(trace: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args([str(trace), *extra])


@pytest.mark.parametrize("name", SMALL_SESSIONS)
def test_agentic_session_replays_with_prefix_reuse(name):
    result = cli.simulate(_args(AGENTIC / name))
    assert result.finished == result.requests > 0
    assert result.preemptions == 0  # the default pool fits the trace
    if result.requests > 1:
        assert result.prefix_hit_rate > 0.5


def test_next_turn_misses_at_most_one_page(tmp_path):
    # bench_prefix_reuse replays a whole folder: give it a folder with two small sessions.
    agentic = tmp_path / "agentic"
    agentic.mkdir()
    for name in SMALL_SESSIONS[1:]:
        (agentic / name).symlink_to(AGENTIC / name)
    out = bench_prefix_reuse(str(tmp_path))
    assert out["turns_checked"] > 0
    assert out["turns_missing_at_most_one_page"] == out["turns_checked"], out


def test_mooncake_open_loop_json(capsys):
    trace = TRACES / "mooncake_conversation_trace.jsonl.gz"
    assert cli.run(_args(trace, "--limit", "150", "--json", "--kv-tokens", "2000000")) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("prefix_hit_rate", "preemptions", "steps", "step_us"):
        assert key in out
    assert out["finished"] == 150 and set(out["step_us"]) >= {"p50", "p90", "p99"}


def test_small_pool_preempts_and_still_finishes():
    trace = TRACES / "mooncake_conversation_trace.jsonl.gz"
    result = cli.simulate(_args(trace, "--limit", "120", "--kv-tokens", "300000", "--time-scale", "0.05"))
    assert result.preemptions > 0
    assert result.finished + result.rejected == result.requests
