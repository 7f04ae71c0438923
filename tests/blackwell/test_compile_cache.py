"""The on-disk cache of compiled CuTe DSL kernels (tokenspeed_kernels_blackwell._compile_cache).

The cache's own logic (key, atomic store, corrupt entries, switch, clear) is tested with a fake
compiled object whose "object file" is a few bytes, so it runs without nvidia-cutlass-dsl.
The end-to-end tests compile the real v3 kernel (sm_90a, bf16, H 16, q_len 1, page 64) in one
subprocess and load it in another (each with CUTE_DSL_ARCH set: the DSL reads it once per
process); they skip without the DSL. Loading needs no GPU, and a loaded kernel checks its
arguments before it launches, so without a GPU the tests can still see that the loaded function
is the kernel of that shape class: its signature, printed by the argument check, names the
shapes and dtypes, and a CPU tensor is refused for want of a CUDA device.
Whether a loaded kernel computes the same bits as a fresh compile is checked on a GPU by
bench/gpu_cute_cache_check.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tokenspeed_kernels_blackwell import _compile_cache as cc

SHAPE = (torch.bfloat16, 16, 1, 576, 512, 64)


# -- fakes: the cache's logic without the DSL ------------------------------------------------------
class FakeCompiled:
    """Stands in for a cute.compile result: export_to_c writes a small 'object file'."""

    def __init__(self, payload: bytes = b"object", on_export=None):
        self.payload, self.on_export = payload, on_export

    def export_to_c(self, path, function_name, export_only_tvm_ffi_symbols=False):
        assert path.endswith(".o") and export_only_tvm_ffi_symbols
        if self.on_export:
            self.on_export(path)
        Path(path).write_bytes(self.payload + b":" + function_name.encode())


class Loaded:
    def __init__(self, data):
        self.data = data


def fake_load_object(obj, function_name):
    data = Path(obj).read_bytes()
    if data.startswith(b"BAD") or not data.endswith(function_name.encode()):
        raise RuntimeError("BinaryExecutionEngine: Failed to add object file")
    return Loaded(data)


class Compiler:
    """compile_fn that counts its calls."""

    def __init__(self, payload=b"object", on_export=None):
        self.calls, self.payload, self.on_export = 0, payload, on_export

    def __call__(self):
        self.calls += 1
        return FakeCompiled(self.payload, self.on_export)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSPEED_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cc.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cc, "_load_object", fake_load_object)
    monkeypatch.setattr(cc, "stats", cc.Stats())
    return tmp_path / "cute"


def key(**change):
    k = cc.make_key("sm_90a", "v3", SHAPE)
    return cc.CacheKey(**{**{f: getattr(k, f) for f in k.__dataclass_fields__}, **change})


def files(d: Path):
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# -- key -----------------------------------------------------------------------------------------
def test_key_changes_with_every_part():
    base = key()
    assert base.digest == key().digest == cc.make_key("sm_90a", "v3", SHAPE).digest
    assert base.digest == hashlib.sha256(json.dumps(base.fields(), sort_keys=True, separators=(",", ":"))
                                         .encode()).hexdigest()[:40]  # no per-process salt
    changed = [
        key(arch="sm_100a"), key(variant="v2"),
        key(shape_class=(torch.float16, *SHAPE[1:])), key(shape_class=(SHAPE[0], 32, *SHAPE[2:])),
        key(shape_class=(*SHAPE[:2], 2, *SHAPE[3:])), key(shape_class=(*SHAPE[:-1], 128)),
        key(libraries=(("apache-tvm-ffi", "0.1.15.post2"), ("nvidia-cutlass-dsl", "4.9.0"))),
        key(libraries=(("apache-tvm-ffi", "0.1.16"), ("nvidia-cutlass-dsl", "4.8.1"))),
        key(source="0" * 64), key(machine="aarch64"), key(dsl_env=(("CUTE_DSL_LINEINFO", "1"),)),
        key(format=cc.FORMAT + 1),
    ]
    digests = [k.digest for k in changed]
    assert base.digest not in digests and len(set(digests)) == len(digests)
    assert len({k.function_name for k in changed + [base]}) == len(changed) + 1


def test_key_reads_library_versions_and_code_generating_env(monkeypatch):
    k = cc.make_key("sm_90a", "v3", SHAPE)
    libs = dict(k.libraries)
    assert "apache-tvm-ffi" in libs and "nvidia-cutlass-dsl" in libs
    assert k.source == cc.source_hash() and len(k.source) == 64
    # where files go and the arch (set per compile by the caller, already in the key) do not count
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_100a")
    monkeypatch.setenv("CUTE_DSL_LOG_LEVEL", "10")
    monkeypatch.setenv("CUTE_DSL_DUMP_DIR", "/tmp/x")
    assert cc.make_key("sm_90a", "v3", SHAPE).digest == k.digest
    monkeypatch.setenv("CUTE_DSL_LINEINFO", "1")  # changes the generated code
    assert cc.make_key("sm_90a", "v3", SHAPE).digest != k.digest


def test_source_hash_changes_when_a_kernel_file_changes(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(cc.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    h0 = cc.source_hash(str(pkg))
    assert h0 == cc.source_hash(cc.PACKAGE_DIR.as_posix()) == cc.source_hash()
    kernel = pkg / "mla_decode_kernel_v3.py"
    text = kernel.read_text()
    kernel.write_text(text + "\n# edited\n")
    cc.source_hash.cache_clear()
    h1 = cc.source_hash(str(pkg))
    assert h1 != h0
    kernel.write_text(text)
    (pkg / "new_kernel.py").write_text("X = 1\n")
    cc.source_hash.cache_clear()
    assert cc.source_hash(str(pkg)) not in (h0, h1)
    assert cc.make_key("sm_90a", "v3", SHAPE, package_dir=str(pkg)).digest != cc.make_key("sm_90a", "v3", SHAPE).digest
    cc.source_hash.cache_clear()


# -- where and whether ---------------------------------------------------------------------------
def test_cache_dir_follows_tokenspeed_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENSPEED_CACHE_DIR", str(tmp_path / "x"))
    assert cc.cache_dir() == tmp_path / "x" / "cute"
    monkeypatch.delenv("TOKENSPEED_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.cache_dir() == tmp_path / "home" / ".cache" / "tokenspeed" / "cute"


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_switched_off_compiles_every_time_and_writes_nothing(cache, monkeypatch, value):
    monkeypatch.setenv(cc.ENV_SWITCH, value)
    assert not cc.enabled()
    comp = Compiler()
    a, b = cc.load_or_compile(key(), comp), cc.load_or_compile(key(), comp)
    assert isinstance(a, FakeCompiled) and isinstance(b, FakeCompiled) and comp.calls == 2
    assert not cache.exists() and cc.stats.compiles == 2 and cc.stats.loads == 0


@pytest.mark.parametrize("var", ["CUTE_DSL_KEEP", "CUTE_DSL_KEEP_PTX"])
def test_asking_the_dsl_for_ptx_turns_the_cache_off(cache, monkeypatch, var):
    # a load dumps no PTX: tests/blackwell/test_cute_mla_decode.py compiles with CUTE_DSL_KEEP=ptx
    # and counts the dumped files
    monkeypatch.setenv(var, "ptx" if var == "CUTE_DSL_KEEP" else "1")
    assert not cc.enabled()
    monkeypatch.setenv(var, "0" if var == "CUTE_DSL_KEEP_PTX" else "")
    assert cc.enabled()


# -- store and load ------------------------------------------------------------------------------
def test_miss_compiles_stores_and_every_later_call_loads(cache):
    k, comp = key(), Compiler()
    first = cc.load_or_compile(k, comp)
    # what runs is what was stored, also in the process that compiled it
    assert isinstance(first, Loaded) and comp.calls == 1
    index = json.loads((cache / f"{k.digest}.json").read_text())
    obj = cache / index["object"]
    assert files(cache) == sorted([f"{k.digest}.json", obj.name])  # no temporaries left
    assert index["key"] == k.fields() and index["sha256"] == hashlib.sha256(obj.read_bytes()).hexdigest()
    assert obj.name == f"{k.digest}-{index['sha256'][:16]}.o"
    again = cc.load_or_compile(k, comp)
    assert isinstance(again, Loaded) and again.data == first.data and comp.calls == 1
    assert (cc.stats.compiles, cc.stats.stores, cc.stats.loads, cc.stats.rejected) == (1, 1, 1, 0)
    # another key is another entry
    other = key(shape_class=(SHAPE[0], 32, *SHAPE[2:]))
    cc.load_or_compile(other, comp)
    assert comp.calls == 2 and f"{other.digest}.json" in files(cache)


def test_store_writes_temporaries_and_renames_object_before_index(cache, monkeypatch):
    k = key()

    def no_final_file_yet(tmp):
        # while the object is written, readers can see neither the index nor the object
        assert Path(tmp).parent == cache and Path(tmp).name.startswith(".tmp-")
        assert not [n for n in files(cache) if not n.startswith(".tmp-")]

    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        assert os.path.basename(src).startswith(".tmp-") and os.path.getsize(src) > 0
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(cc.os, "replace", recording_replace)
    cc.load_or_compile(k, Compiler(on_export=no_final_file_yet))
    assert len(renamed) == 2 and renamed[0].endswith(".o") and renamed[1] == f"{k.digest}.json"


def test_readers_never_see_a_partial_entry_while_writers_replace_it(cache):
    # writers keep re-storing the key with different object bytes (as two processes whose exports
    # differ would); readers must always get a whole, checksummed entry, never a rejection
    import threading

    k = key()
    cc.load_or_compile(k, Compiler())
    stop, seen, errors = threading.Event(), [], []

    def writer(i):
        n = 0
        while not stop.is_set():
            n += 1
            cc._store(cache, k, FakeCompiled(b"w%d-%d-" % (i, n) + b"x" * 65536), 0.0)

    def reader():
        try:
            for _ in range(300):
                got = cc._load(cache, k)
                assert isinstance(got, Loaded), got
                seen.append(got.data[:8])
        except BaseException as e:  # reported below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert not errors and cc.stats.rejected == 0, errors
    assert len(seen) == 900 and len(set(seen)) > 1  # the readers did see the entry change


def test_interrupted_store_leaves_nothing_and_is_not_fatal(cache):
    def half_written_then_fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    comp = Compiler(on_export=half_written_then_fail)
    with pytest.warns(cc.CacheWarning, match="could not store"):
        got = cc.load_or_compile(key(), comp)
    assert isinstance(got, FakeCompiled)  # the fresh compile still runs
    assert files(cache) == []
    with pytest.warns(cc.CacheWarning):
        cc.load_or_compile(key(), comp)
    assert comp.calls == 2


def test_unwritable_cache_dir_runs_uncached(tmp_path, monkeypatch, cache):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TOKENSPEED_CACHE_DIR", str(blocker))
    with pytest.warns(cc.CacheWarning, match="could not store"):
        assert isinstance(cc.load_or_compile(key(), Compiler()), FakeCompiled)


def _entry(cache, k):
    index = cache / f"{k.digest}.json"
    return index, json.loads(index.read_text())


def _flip_byte(cache, k):
    _, e = _entry(cache, k)
    obj = cache / e["object"]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    obj.write_bytes(bytes(data))


def _truncate_index(cache, k):
    index, _ = _entry(cache, k)
    index.write_text(index.read_text()[:40])


def _index_not_json(cache, k):
    _entry(cache, k)[0].write_bytes(b"\x00\xff garbage")


def _object_missing(cache, k):
    (cache / _entry(cache, k)[1]["object"]).unlink()


def _index_of_another_key(cache, k):
    index, e = _entry(cache, k)
    e["key"]["variant"] = "v2"
    index.write_text(json.dumps(e))


def _object_does_not_load(cache, k):
    # the checksum matches, but the linker refuses the object
    index, e = _entry(cache, k)
    obj = cache / e["object"]
    obj.write_bytes(b"BAD" + obj.read_bytes())
    e["sha256"] = hashlib.sha256(obj.read_bytes()).hexdigest()
    index.write_text(json.dumps(e))


@pytest.mark.parametrize("damage", [_flip_byte, _truncate_index, _index_not_json, _object_missing,
                                    _index_of_another_key, _object_does_not_load])
def test_damaged_entry_is_reported_and_recompiled(cache, damage):
    k, comp = key(), Compiler()
    cc.load_or_compile(k, comp)
    damage(cache, k)
    with pytest.warns(cc.CacheWarning, match="ignoring cache entry"):
        got = cc.load_or_compile(k, comp)
    assert isinstance(got, Loaded) and comp.calls == 2 and cc.stats.rejected == 1
    # the entry was rewritten whole: the next call loads it
    cc.load_or_compile(k, comp)
    assert comp.calls == 2 and cc.stats.loads == 1


def test_clear_removes_entries_and_temporaries(cache):
    assert cc.clear() == 0  # no folder yet
    cc.load_or_compile(key(), Compiler())
    cc.load_or_compile(key(variant="v2"), Compiler())
    (cache / ".tmp-abc-123.o").write_bytes(b"left by a killed process")
    (cache / "README").write_text("not ours")
    assert cc.clear() == 5
    assert files(cache) == ["README"]
    comp = Compiler()
    cc.load_or_compile(key(), comp)
    assert comp.calls == 1


def test_prune_keeps_what_this_process_can_load(cache):
    assert cc.prune() == 0  # no folder yet
    live = [key(), key(variant="v2"), key(arch="sm_100a")]
    stale = [key(source="0" * 64), key(libraries=(("nvidia-cutlass-dsl", "4.7.0"),)), key(format=0)]
    for k in live + stale:
        cc.load_or_compile(k, Compiler())
    orphan = cache / f"{live[0].digest}-0123456789abcdef.o"  # a writer that lost a race
    orphan.write_bytes(b"x")
    (cache / f"{'f' * 40}.json").write_text("{not json")
    fresh_tmp, old_tmp = cache / ".tmp-new-1.o", cache / ".tmp-old-1.o"
    fresh_tmp.write_bytes(b"being written")
    old_tmp.write_bytes(b"left by a killed process")
    os.utime(old_tmp, (0, 0))
    before = set(files(cache))
    assert cc.prune() == 2 * len(stale) + 3
    gone = before - set(files(cache))
    assert orphan.name in gone and old_tmp.name in gone and fresh_tmp.name not in gone
    comp = Compiler()
    for k in live:
        cc.load_or_compile(k, comp)
    assert comp.calls == 0  # every live entry still loads


# -- the real kernel, across processes -----------------------------------------------------------
CHILD = textwrap.dedent("""
    import inspect, json, os, sys, time, warnings
    t0 = time.perf_counter()
    import torch
    from tokenspeed_kernels_blackwell import _compile_cache as cc, mla_decode as cm
    import cutlass.cute  # imported before timing: a fresh compile and a load both need it
    shape = (torch.bfloat16, 16, 1, 576, 512, 64)
    key = cc.make_key("sm_90a", "v3", shape)
    compiles = []

    def compile_v3():
        compiles.append(1)
        args = ["sm_90a", torch.bfloat16, 16, 1, 576, 512, 64, "v3"]
        if "kv_dtype" in inspect.signature(cm._compile).parameters:  # fp8-cache era signature
            args.append(torch.bfloat16)
        return cm._compile(*args)

    if sys.argv[1] == "break-object":  # a whole, checksummed object that the linker refuses
        d = cc.cache_dir()
        entry = json.loads((d / f"{key.digest}.json").read_text())
        obj = d / entry["object"]
        obj.write_bytes(b"\\x7fELF" + b"\\0" * 60)
        import hashlib
        entry["sha256"] = hashlib.sha256(obj.read_bytes()).hexdigest()
        (d / f"{key.digest}.json").write_text(json.dumps(entry))
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = cc.load_or_compile(key, compile_v3)
    t2 = time.perf_counter()
    b, m = 2, 16
    cpu = (torch.randn(b, m, 576, dtype=torch.bfloat16), torch.randn(128, 576, dtype=torch.bfloat16),
           torch.zeros(b, 2, dtype=torch.int32), torch.ones(b, dtype=torch.int32),
           torch.empty(b, 3, m, 512), torch.empty(b, 3, m), torch.empty(b, m, 512, dtype=torch.bfloat16),
           torch.empty(b, m), 1.0, 1.0)  # no stream: TVM-FFI's environment stream
    errors = []
    for args in (cpu[:5], cpu):
        try:
            fn(*args)
            errors.append("ran")
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    ours = [str(w.message) for w in caught if issubclass(w.category, cc.CacheWarning)]
    print(json.dumps(dict(compiles=len(compiles), stats=cc.stats.__dict__, errors=errors, module=cc.__file__,
                          type=f"{type(fn).__module__}.{type(fn).__name__}", warnings=ours,
                          seconds=round(t2 - t1, 3), import_seconds=round(t1 - t0, 3))))
""")


def _snapshot(tmp_path):
    """A copy of the package for the children: its source hash cannot change between them even
    while someone edits the checkout (which, rightly, makes the next process compile afresh)."""
    src = tmp_path / "src"
    shutil.copytree(cc.PACKAGE_DIR, src / cc.PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _child(tmp_path, mode="run"):
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", TOKENSPEED_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop(cc.ENV_SWITCH, None)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is_the_v3_h16_kernel(run):
    few, cpu = run["errors"]
    assert run["type"] == "tvm_ffi.core.Function", run
    # the argument check states the compiled signature: 10 parameters (the stream is TVM-FFI's
    # environment stream, not an argument), H x q_len = 16 folded rows
    assert few.startswith("TypeError: Expects 10 parameters"), few
    for part in ("mQ: Tensor([n0, 16, 576], bfloat16)", "mKV: Tensor([n1, 576], bfloat16)",
                 "mOut: Tensor([n0, 16, 512], bfloat16)", "mLse: Tensor([n0, 16], float32)"):
        assert part in few, (part, few)
    assert cpu.startswith("ValueError") and "expected device_type=cuda" in cpu, cpu


def test_second_process_loads_the_compiled_kernel_from_disk(tmp_path):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    _snapshot(tmp_path)
    first = _child(tmp_path)
    assert first["module"].startswith(str(tmp_path)), first["module"]
    assert first["compiles"] == 1 and first["stats"] == dict(compiles=1, loads=0, stores=1, rejected=0), first
    assert not first["warnings"], first["warnings"]
    _is_the_v3_h16_kernel(first)
    second = _child(tmp_path)
    assert second["compiles"] == 0 and second["stats"] == dict(compiles=0, loads=1, stores=0, rejected=0), second
    assert not second["warnings"], second["warnings"]
    _is_the_v3_h16_kernel(second)
    assert second["errors"] == first["errors"]
    print(f"v3 sm_90a bf16 H16 q1: compile+store {first['seconds']} s, load {second['seconds']} s")

    # an object the linker refuses is reported and replaced, not fatal
    third = _child(tmp_path, "break-object")
    assert third["compiles"] == 1 and third["stats"]["rejected"] == 1, third
    assert any("ignoring cache entry" in w and "Failed to add object file" in w for w in third["warnings"]), third
    _is_the_v3_h16_kernel(third)
    fourth = _child(tmp_path)
    assert fourth["compiles"] == 0 and fourth["stats"]["loads"] == 1, fourth
