"""cffi build script (API mode, out-of-line) for the C++ scheduler.

setup.py names it in ``cffi_modules``; ``pip install .`` compiles the C ABI header's declarations
plus every ``scheduler/src/*.cpp`` into the extension module ``tokenspeed._scheduler_cffi``.
``depends=`` lists the headers, so editing a header rebuilds the extension.
"""

from __future__ import annotations

import glob
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
ABI_HEADER = os.path.join(_HERE, "include", "tokenspeed_scheduler.h")


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the project root (where setup.py runs).
    return os.path.relpath(path, _ROOT) if os.getcwd() == _ROOT else path


def cdef_text() -> str:
    """The part of the ABI header between the CDEF markers: plain C declarations for cffi."""
    with open(ABI_HEADER, encoding="utf-8") as f:
        text = f.read()
    begin = text.index("/* CDEF BEGIN")
    begin = text.index("*/", begin) + 2
    end = text.index("/* CDEF END */")
    return text[begin:end]


def make_builder(extra_compile_args: list[str] | None = None, extra_link_args: list[str] | None = None,
                 absolute_paths: bool = False) -> FFI:
    """The FFI builder; tests pass sanitizer flags (and absolute paths, for ``compile(tmpdir=)``)
    to build an instrumented copy elsewhere."""
    rel = (lambda p: p) if absolute_paths else _rel
    builder = FFI()
    builder.cdef(cdef_text())
    builder.set_source(
        "tokenspeed._scheduler_cffi",
        '#include "tokenspeed_scheduler.h"',
        source_extension=".cpp",
        sources=sorted(rel(p) for p in glob.glob(os.path.join(_HERE, "src", "*.cpp"))),
        include_dirs=[rel(os.path.join(_HERE, "include"))],
        depends=sorted(rel(p) for p in glob.glob(os.path.join(_HERE, "include", "**", "*.h*"), recursive=True)),
        extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden", *(extra_compile_args or [])],
        extra_link_args=list(extra_link_args or []),
        language="c++",
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(_HERE, "_build"), verbose=True)
