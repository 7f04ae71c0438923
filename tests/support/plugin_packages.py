"""Write small plugin distributions to disk and install them for real (pip --target)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_plugin(root: Path, name: str, module_code: str, entry: str | None = None) -> Path:
    """A distribution ``tokenspeed-test-<name>`` with entry point ``<name>`` -> its module."""
    pkg = f"tokenspeed_test_{name}"
    d = root / name
    (d / pkg).mkdir(parents=True)
    (d / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tokenspeed-test-{name}"
        version = "0.0.1"
        [project.entry-points."tokenspeed.kernels"]
        {name} = "{entry or pkg}"
        [tool.setuptools]
        packages = ["{pkg}"]
    """))
    (d / pkg / "__init__.py").write_text(textwrap.dedent(module_code))
    return d


def pip_install_target(target: Path, *paths: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--target", str(target), *map(str, paths)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def run_with(target: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python args...`` with the installed plugins visible (fresh process, fresh registry)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), e.get("PYTHONPATH", "")])
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, cwd=REPO, timeout=600)
