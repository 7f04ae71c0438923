"""Developer sessions: tests, lint, bench, wheels.  `nox -s tests` etc.

Sessions install torch==2.13.0 first (CPU wheel; an unpinned torch pulls a ~5 GB CUDA build);
set TOKENSPEED_TORCH to override on a GPU machine.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = os.environ.get("TOKENSPEED_TORCH", "torch==2.13.0")
PACKAGES = (".", "./tokenspeed_kernels_triton", "./tokenspeed_kernels_blackwell")


def _install(session: nox.Session, dev: bool = True) -> None:
    session.install(TORCH)
    session.install("setuptools>=77", "wheel", "cffi>=1.16")
    args = ["--no-build-isolation", "-e", ".[dev]" if dev else "."]
    for pkg in PACKAGES[1:]:
        args += ["-e", pkg]
    session.install(*args)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite (GPU tests skip without CUDA)."""
    _install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "tokenspeed_core", "tokenspeed", "tokenspeed_kernels_triton",
                "tokenspeed_kernels_blackwell", "examples", "tests", "bench", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """What a user runs first: the kernels on this device, then every op on every backend."""
    _install(session, dev=False)
    session.run("tokenspeed", "kernels")
    session.run("tokenspeed", "bench", *session.posargs)


@nox.session
def wheels(session: nox.Session) -> None:
    """Wheels of all three distributions into dist/."""
    session.install("setuptools>=77", "wheel", "cffi>=1.16", "build")
    for pkg in PACKAGES:
        session.run("python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", pkg)
