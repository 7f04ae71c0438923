"""On-disk cache of compiled CuTe DSL kernels: compile once per machine, not once per process.

One compile of an MLA decode shape class costs 1.5-3 s of CPU (v3 on a 2-core machine: ~40%
tracing the Python kernel into MLIR, ~60% MLIR passes, NVVM and ptxas); the registry advertises
64 classes per arch. This module keeps each compiled kernel on disk (~0.1 MB) and loads it back
in 2-25 ms.

Mechanism: the library's own ahead-of-time path, nothing hand-serialised. A kernel compiled with
``--enable-tvm-ffi`` is written with ``JitCompiledFunction.export_to_c(path.o, function_name=...)``:
a relocatable host object (the launch code) with the cubins embedded, whose only visible symbol
is ``__tvm_ffi_<function_name>``. ``cutlass.cute.runtime.load_module(path.o, enable_tvm_ffi=True)``
links it in memory (LLVM JITLink, the same engine ``cute.compile`` itself uses for a TVM-FFI
function) and ``getattr(module, function_name)`` is a ``tvm_ffi.Function``. Loading needs no GPU
and no C compiler. The DSL's own file cache (``CUTE_DSL_CACHE_DIR``) does not serve here:
``cute.compile`` turns it off (compile_only), and it is keyed by the hash of the traced IR, so
the tracing would be paid anyway.

What is returned: always the function loaded from the stored object, also right after a fresh
compile, so the first process runs exactly the bytes that later processes load (an export bug
shows at once, not on the next start). It is a positional-only ``tvm_ffi.Function``: call it
with all arguments in order, as ``mla_decode`` does (a fresh compile also accepts keywords).
If storing or reloading fails, the fresh compile is returned and a warning says why.

Key (sha256 over a canonical JSON, see :class:`CacheKey`): arch, kernel variant, shape class,
the versions of every ``nvidia-cutlass-dsl*`` distribution and of ``apache-tvm-ffi``, a hash
of the ``*.py`` files of this package (an edited kernel never loads a stale binary), the host
CPU architecture (the object is host code: a cache shared between x86_64 and aarch64 machines
stays correct), the ``CUTE_DSL_*`` environment that can change code generation, and
:data:`FORMAT`.

Layout, in :func:`cache_dir` (``$TOKENSPEED_CACHE_DIR/cute``, else ``~/.cache/tokenspeed/cute``):

- ``<key>.json``: the index entry: the key fields, the object's file name and sha256, the
  compile time. Written last.
- ``<key>-<sha256[:16]>.o``: the object, named by its content, so it never changes once written.

Both are written to a temporary file in the same folder and renamed into place
(``os.replace``), so a reader sees a whole file or none. Two processes compiling the same key
at once both compile and the last rename wins; the index always names a complete object
whose checksum it holds. A reader that finds a missing or unreadable index, a missing object,
a checksum mismatch, a key mismatch or an object that does not load warns and recompiles:
nothing in the cache is ever fatal. ``TOKENSPEED_CUTE_CACHE=0`` turns the cache off, and so
does ``CUTE_DSL_KEEP=ptx`` and the like (a load dumps no PTX); :func:`clear` empties it and
:func:`prune` deletes what this process could never load (other versions, other sources).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of an entry changes: old entries are then never read.
FORMAT = 1
ENV_SWITCH = "TOKENSPEED_CUTE_CACHE"
_OFF = ("0", "false", "off", "no")
# CUTE_DSL_* variables that cannot change the generated code (where files go, logging) or that
# the key already holds (ARCH: the caller sets it per compile and passes the arch explicitly).
_ENV_NOT_IN_KEY = ("CUTE_DSL_ARCH", "CUTE_DSL_CACHE_DIR", "CUTE_DSL_DUMP_DIR", "CUTE_DSL_LOG_TO_CONSOLE",
                   "CUTE_DSL_LOG_TO_FILE", "CUTE_DSL_LOG_LEVEL", "CUTE_DSL_PRINT_IR", "CUTE_DSL_KEEP",
                   "CUTE_DSL_JIT_TIME_PROFILING", "CUTE_DSL_NO_CACHE", "CUTE_DSL_DISABLE_FILE_CACHING",
                   "CUTE_DSL_JIT_CACHE_MAX_ELEMS", "CUTE_DSL_FILTER_STACKTRACE", "CUTE_DSL_SHOW_STACKTRACE")
_KEEP_VARS = ("CUTE_DSL_KEEP", "CUTE_DSL_KEEP_IR", "CUTE_DSL_KEEP_PTX", "CUTE_DSL_KEEP_CUBIN",
              "CUTE_DSL_KEEP_SASS")
PACKAGE_DIR = Path(__file__).resolve().parent


class CacheWarning(UserWarning):
    """A cache entry could not be used or written; the kernel was compiled instead."""


# -- where and whether ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$TOKENSPEED_CACHE_DIR/cute``, else ``~/.cache/tokenspeed/cute`` (the base folder is the
    one tokenspeed_core.bench uses for its ceilings)."""
    base = os.environ.get("TOKENSPEED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tokenspeed")
    return Path(base) / "cute"


def enabled() -> bool:
    """False when ``TOKENSPEED_CUTE_CACHE`` is 0/false/off/no, or when ``CUTE_DSL_KEEP*`` asks
    the DSL to dump IR/PTX/CUBIN/SASS: those are written by a compile, so a load would silently
    produce none (the DSL turns its own cache off for them too). Read on every call."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in _OFF:
        return False
    return not any(os.environ.get(k, "").strip().lower() not in ("", "0", "false") for k in _KEEP_VARS)


def clear() -> int:
    """Delete every entry (index files, objects, leftover temporaries); returns how many files."""
    d = cache_dir()
    if not d.is_dir():
        return 0
    n = 0
    for p in d.iterdir():
        if p.is_file() and (p.suffix in (".json", ".o") or p.name.startswith(".tmp")):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:  # another process cleared it first
                pass
    return n


def prune() -> int:
    """Delete what this process can never load: entries of other library versions, other kernel
    sources, other host CPUs or other cache formats (every kernel edit leaves ~0.1 MB per shape
    class behind), unreadable index files, objects no index names (a writer that lost a race),
    and temporaries older than an hour. Entries that differ only in arch, variant, shape class
    or ``CUTE_DSL_*`` settings are kept. Returns how many files were deleted."""
    d = cache_dir()
    if not d.is_dir():
        return 0
    current = make_key("", "", ()).fields()
    same = ("libraries", "source", "machine", "format")
    keep: set[str] = set()
    doomed: list[Path] = []
    for index in d.glob("*.json"):
        try:
            entry = json.loads(index.read_bytes())
            if all(entry["key"][f] == current[f] for f in same):
                keep.add(index.name)
                keep.add(entry["object"])
                continue
        except Exception:  # unreadable: nothing can load it
            pass
        doomed.append(index)
    old = time.time() - 3600
    for p in d.iterdir():
        if p.suffix == ".o" and not p.name.startswith(".tmp") and p.name not in keep:
            doomed.append(p)
        elif p.name.startswith(".tmp"):
            try:
                if p.stat().st_mtime < old:
                    doomed.append(p)
            except FileNotFoundError:  # renamed into place meanwhile
                pass
    n = 0
    for p in doomed:
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


# -- key -----------------------------------------------------------------------------------------
@functools.cache
def source_hash(package_dir: str | None = None) -> str:
    """sha256 over the relative names and bytes of every ``*.py`` file of the package (once per
    process: a kernel edited while a process runs is picked up by the next process)."""
    root = Path(package_dir) if package_dir else PACKAGE_DIR
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def library_versions() -> tuple[tuple[str, str], ...]:
    """(distribution, version) of every installed ``nvidia-cutlass-dsl*`` (the libs-cu12 and
    libs-cu13 builds differ) and of ``apache-tvm-ffi``; "missing" where one is absent."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nvidia-cutlass-dsl") or name == "apache-tvm-ffi":
            found.setdefault(name, dist.version)
    if "nvidia-cutlass-dsl" not in found:  # unpacked without metadata: ask the module
        try:
            import cutlass

            found["nvidia-cutlass-dsl"] = str(getattr(cutlass, "__version__", "missing"))
        except ImportError:
            found["nvidia-cutlass-dsl"] = "missing"
    found.setdefault("apache-tvm-ffi", "missing")
    return tuple(sorted(found.items()))


def _dsl_env() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.startswith("CUTE_DSL_") and k not in _ENV_NOT_IN_KEY))


def _canon(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return [_canon(v) for v in x]
    return str(x)  # torch.dtype -> "torch.bfloat16"


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """Everything that decides the bytes of a compiled kernel. Build with :func:`make_key`."""

    arch: str
    variant: str
    shape_class: tuple
    libraries: tuple[tuple[str, str], ...]
    source: str
    machine: str
    dsl_env: tuple[tuple[str, str], ...]
    format: int = FORMAT

    def fields(self) -> dict:
        return {f.name: _canon(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @functools.cached_property
    def digest(self) -> str:
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    @property
    def function_name(self) -> str:
        """The exported symbol's name (unique per key: objects never clash in one process)."""
        return "tokenspeed_cute_" + self.digest[:24]


def make_key(arch: str, variant: str, shape_class: tuple, *, package_dir: str | None = None) -> CacheKey:
    """The key of one compiled kernel: ``shape_class`` is every static parameter of the compile
    (dtype, heads, q_len, head dims, page size, ...); the rest is read from this process."""
    return CacheKey(arch=arch, variant=variant, shape_class=tuple(shape_class),
                    libraries=library_versions(), source=source_hash(package_dir),
                    machine=platform.machine(), dsl_env=_dsl_env())


# -- load or compile -----------------------------------------------------------------------------
@dataclasses.dataclass
class Stats:
    """What this process did (tests and the GPU check read it)."""

    compiles: int = 0
    loads: int = 0
    stores: int = 0
    rejected: int = 0  # entries found but unusable (warned, recompiled)


stats = Stats()
_lock = threading.Lock()


def load_or_compile(key: CacheKey, compile_fn: Callable[[], Any]) -> Any:
    """The kernel of ``key``: loaded from disk when a valid entry exists, else ``compile_fn()``
    compiled, stored and reloaded. ``compile_fn`` returns a ``cute.compile(...,
    options="--enable-tvm-ffi ...")`` result. With the cache off, just ``compile_fn()``."""
    if not enabled():
        stats.compiles += 1
        return compile_fn()
    d = cache_dir()
    fn = _load(d, key)
    if fn is not None:
        stats.loads += 1
        return fn
    t0 = time.perf_counter()
    compiled = compile_fn()
    seconds = time.perf_counter() - t0
    stats.compiles += 1
    try:
        obj = _store(d, key, compiled, seconds)
        stats.stores += 1
    except Exception as e:  # read-only home, full disk, export error: run uncached
        _warn(f"could not store compiled kernel {key.digest} in {d}: {type(e).__name__}: {e}")
        return compiled
    try:
        return _load_object(obj, key.function_name)
    except Exception as e:
        _warn(f"stored kernel {obj} does not load back, using the fresh compile: {type(e).__name__}: {e}")
        return compiled


class KernelMemo:
    """One op's compiled kernels in this process, in front of the disk cache: a kernel is looked
    up without a lock once it is there, and compiled (or loaded) once however many threads ask."""

    def __init__(self) -> None:
        self._fns: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, disk_key: Callable[[], CacheKey], compile_fn: Callable[[], Any]) -> Any:
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._fns.get(key)
            if fn is None:
                fn = self._fns[key] = load_or_compile(disk_key(), compile_fn)
        return fn

    def clear(self) -> None:
        """Forget this process's kernels (the disk cache stays): the next ``get`` loads or compiles."""
        with self._lock:
            self._fns.clear()


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, CacheWarning, stacklevel=3)


def _load(d: Path, key: CacheKey) -> Any | None:
    index = d / f"{key.digest}.json"
    try:
        raw = index.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder): a miss
        return None
    except OSError as e:
        return _reject(index, f"unreadable: {e}")
    try:
        entry = json.loads(raw)
        obj = d / entry["object"]
        if entry.get("key") != key.fields():
            return _reject(index, "key fields differ from the wanted key")
        data = obj.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return _reject(index, f"checksum mismatch in {obj.name}")
        return _load_object(obj, key.function_name)
    except Exception as e:  # malformed JSON, missing object, JITLink refusing the object, ...
        return _reject(index, f"{type(e).__name__}: {e}")


def _reject(index: Path, why: str) -> None:
    stats.rejected += 1
    _warn(f"ignoring cache entry {index}: {why}; recompiling")
    return None


def _load_object(obj: Path, function_name: str):
    from cutlass.cute.runtime import load_module

    with _lock:  # the DSL's runtime-library bookkeeping in load_module is not locked
        return getattr(load_module(str(obj), enable_tvm_ffi=True), function_name)


def _store(d: Path, key: CacheKey, compiled: Any, seconds: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    # export_to_c picks the format from the suffix: the temporary name must end in .o
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".tmp-{key.digest[:12]}-", suffix=".o")
    os.close(fd)
    try:
        compiled.export_to_c(tmp, function_name=key.function_name, export_only_tvm_ffi_symbols=True)
        data = Path(tmp).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        obj = d / f"{key.digest}-{digest[:16]}.o"
        os.replace(tmp, obj)
    except BaseException:
        _unlink(tmp)
        raise
    entry = dict(key=key.fields(), object=obj.name, sha256=digest, compile_seconds=round(seconds, 3),
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_atomic(d / f"{key.digest}.json", json.dumps(entry, indent=1, sort_keys=True).encode())
    return obj


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem[:12]}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["CacheKey", "CacheWarning", "KernelMemo", "Stats", "cache_dir", "clear", "enabled", "library_versions",
           "load_or_compile", "make_key", "prune", "source_hash", "stats"]
