"""The CLI works on a CPU-only machine: kernels, env, bench (reference backend, small preset), check."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tokenspeed_core as tc
from tokenspeed.cli import main
from tokenspeed_core.bench import format_shape, measure_ceilings, parse_shape, run_bench


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSPEED_CACHE_DIR", str(tmp_path))


def test_kernels_json(capsys):
    assert main(["kernels", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ops = {e["op"] for e in info["implementations"]}
    assert "mla_decode" in ops
    assert all(any(e["selected"] for e in info["implementations"] if e["op"] == op) for op in ops)


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "reference" in info["plugins"]


def test_bench_mla_decode_small_preset_writes_json_and_csv(tmp_path, capsys):
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    rc = main(["bench", "mla_decode", "--preset", "small", "--backends", "reference", "--iters", "3",
               "--json", str(j), "--csv", str(c)])
    assert rc == 0
    data = json.loads(j.read_text())
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["gemm_tflops"] > 0
    rows = data["rows"]
    assert len(rows) == 2 and all(r["backend"] == "reference" and r["median_us"] > 0 for r in rows)
    assert all(0 < r["pct_copy"] and math.isfinite(r["tflops"]) for r in rows)
    assert rows[0]["repro"].startswith("tokenspeed bench mla_decode --shape")
    assert c.read_text().count("\n") == 3
    assert "% copy" in capsys.readouterr().out


def test_bench_l2_flush_option_reaches_the_repro(tmp_path):
    j = tmp_path / "r.json"
    rc = main(["bench", "mla_decode", "--preset", "small", "--backends", "reference", "--iters", "3",
               "--l2-flush", "read", "--json", str(j)])
    assert rc == 0
    rows = json.loads(j.read_text())["rows"]
    assert rows and all(r["repro"].endswith("--l2-flush read") for r in rows)
    with pytest.raises(SystemExit):
        main(["bench", "mla_decode", "--l2-flush", "dirty"])


def test_bench_repro_shape_roundtrip():
    case = dict(B=2, q_len=4, H=16, page_size=64, seqlens=[5, 9], dtype=torch.bfloat16, ragged=False)
    assert parse_shape(format_shape(case)) == case


def test_run_bench_reports_unsupported_backend_as_row():
    reg = tc.build_registry(entry_points=False)
    with reg.registering_as("t"):
        reg.register("mla_decode", lambda **k: None, backend="gpu", devices=("cuda",))
    ceil = measure_ceilings("cpu", quick=True)
    rows = run_bench("mla_decode", [dict(B=1, q_len=1, H=2, page_size=16, seqlen=40, dtype=torch.float32)],
                     registry=reg, device=torch.device("cpu"), ceilings=ceil, backends=["gpu", "reference"], iters=2)
    by = {r.backend: r for r in rows}
    assert by["gpu"].error.startswith("unsupported: device cpu") and by["reference"].median_us > 0


def test_check_reference_passes(capsys):
    assert main(["check", "reference", "--ops", "mla_decode"]) == 0
    assert "reference: PASS" in capsys.readouterr().out


def test_time_calls_flush_modes():
    """The L2 flush before each timed call: a write (the default, as triton's do_bench), a read
    (clean lines) or none; anything else is refused by name. On CPU there is nothing to flush."""
    from tokenspeed_core.bench import time_calls

    calls = [lambda: None]
    for mode in (True, "write", "read", False):
        t = time_calls(calls, torch.device("cpu"), warmup=1, iters=3, flush_l2=mode)
        assert t.method == "wall-clock" and t.iters == 3
    with pytest.raises(ValueError, match="flush_l2"):
        time_calls(calls, torch.device("cpu"), flush_l2="dirty")


def test_l2_flush_ops_run_on_a_buffer():
    """The flush functions the CUDA timing path calls, run here on a CPU buffer: the write zeroes
    every word, the read reduces every word into the scratch scalar without allocating."""
    from tokenspeed_core.bench._timing import make_l2_flush

    buf = torch.randint(-1000, 1000, (1 << 16,), dtype=torch.int32)
    scratch = torch.zeros((), dtype=torch.int64)
    make_l2_flush(buf, "read", scratch)()
    assert int(scratch) == int(buf.view(torch.int64).sum())
    make_l2_flush(buf, "write", None)()
    assert not buf.any()
    make_l2_flush(None, False, None)()  # no flush: nothing to touch


def test_gpu_state_reads_nvidia_smi_and_says_nothing_without_a_gpu(monkeypatch):
    """What a timing ran at: nvidia-smi's clock / power / temperature line parsed, unreadable
    fields left out, and an empty dict where no tool answers (this machine)."""
    from tokenspeed_core.bench import _gpu_state
    from tokenspeed_core.bench._gpu_state import parse_smi

    assert parse_smi("1755, 612.31, 71\n") == {"sm_mhz": 1755.0, "power_w": 612.31, "temp_c": 71.0}
    assert parse_smi("1980, [N/A], 40") == {"sm_mhz": 1980.0, "temp_c": 40.0}
    assert parse_smi("") == {}
    monkeypatch.setattr(_gpu_state.shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # no NVML binding either
    assert _gpu_state.gpu_state() == {}
