"""Builds and runs the C++ unit tests (plain and ASan+UBSan) and the compile-fail snippets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHED = ROOT / "scheduler"
SOURCES = [SCHED / "src" / n for n in ("page_pool.cpp", "prefix_cache.cpp", "scheduler.cpp")]
COMPILE_FAIL = sorted((SCHED / "tests" / "compile_fail").glob("*.cpp"))
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not found")


def _build(out: Path, *flags: str) -> Path:
    cmd = [CXX, "-std=c++20", "-g", "-Wall", "-Wextra", "-Werror", f"-I{SCHED / 'include'}", *flags,
           str(SCHED / "tests" / "test_scheduler.cpp"), *map(str, SOURCES), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{proc.stderr}"
    return out


def _run(binary: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{binary.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "all scheduler C++ tests passed" in proc.stdout


def test_cpp_unit_tests(tmp_path: Path) -> None:
    _run(_build(tmp_path / "test_scheduler", "-O1"))


def test_cpp_unit_tests_under_asan_ubsan(tmp_path: Path) -> None:
    binary = _build(tmp_path / "test_scheduler_asan", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
    _run(binary, {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"})


def _syntax_check(snippet: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", f"-I{SCHED / 'include'}",
                           str(snippet)], capture_output=True, text=True)


@pytest.mark.parametrize("snippet", [p for p in COMPILE_FAIL if p.name.startswith("ok_")], ids=lambda p: p.stem)
def test_control_snippet_compiles(snippet: Path) -> None:
    proc = _syntax_check(snippet)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("snippet", [p for p in COMPILE_FAIL if p.name.startswith("fail_")], ids=lambda p: p.stem)
def test_illegal_transition_does_not_compile(snippet: Path) -> None:
    expected = re.search(r"// expect-error: (.+)", snippet.read_text()).group(1).strip()
    proc = _syntax_check(snippet)
    assert proc.returncode != 0, f"{snippet.name} compiled but must not"
    assert re.search(expected, proc.stderr), f"{snippet.name} failed for another reason:\n{proc.stderr}"


def test_compile_fail_suite_is_not_empty() -> None:
    assert len([p for p in COMPILE_FAIL if p.name.startswith("fail_")]) >= 5
