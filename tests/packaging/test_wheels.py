"""The three distributions build as wheels, and `pip install --find-links dist 'tokenspeed[blackwell]'`
in a fresh venv resolves all three of ours from them.

Third-party requirements (torch, triton, nvidia-cutlass-dsl, ...) are stubbed with empty wheels of a
satisfying version, generated from our wheels' own metadata, so the resolution of our extras and
pins is pip's real one while nothing heavy is downloaded.
"""

from __future__ import annotations

import email.parser
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
OURS = {"tokenspeed", "tokenspeed-kernels-triton", "tokenspeed-kernels-blackwell"}

pytestmark = pytest.mark.slow


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def _stub_version(req: Requirement) -> str:
    for spec in req.specifier:
        if spec.operator in ("==", ">=", "~=", "==="):
            return spec.version.rstrip(".*")
    return "1.0.0"


def _write_stub_wheel(dest: Path, name: str, version: str) -> None:
    norm = name.replace("-", "_")
    di = f"{norm}-{version}.dist-info"
    files = {
        f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{di}/WHEEL": "Wheel-Version: 1.0\nGenerator: tokenspeed-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{di}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(dest / f"{norm}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_blackwell_extra_resolves_our_three_wheels(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
         str(REPO), str(REPO / "tokenspeed_kernels_triton"), str(REPO / "tokenspeed_kernels_blackwell")],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    wheels = sorted(dist.glob("*.whl"))
    names = {_metadata(w)["Name"] for w in wheels}
    assert names == OURS, names

    # every third-party requirement reachable from tokenspeed[blackwell], stubbed
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    needed: dict[str, Requirement] = {}
    for w in wheels:
        for line in _metadata(w).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.name in OURS:
                continue
            if req.marker and not req.marker.evaluate({"extra": "blackwell"}):
                continue
            needed.setdefault(req.name, req)
    for name, req in needed.items():
        _write_stub_wheel(stubs, name, _stub_version(req))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
         "--find-links", str(dist), "--find-links", str(stubs), "tokenspeed[blackwell]"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    check = subprocess.run(
        [str(py), "-c",
         "import importlib.metadata as m, json;"
         "print(json.dumps({'versions': {d: m.version(d) for d in "
         "('tokenspeed', 'tokenspeed-kernels-triton', 'tokenspeed-kernels-blackwell')},"
         "'eps': sorted(e.name for e in m.entry_points(group='tokenspeed.kernels')),"
         "'path': str(m.distribution('tokenspeed').locate_file('tokenspeed_core/__init__.py'))}))"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    info = json.loads(check.stdout)
    assert info["versions"] == dict.fromkeys(OURS, "0.1.0")
    assert info["eps"] == ["cute", "triton"]
    assert info["path"].startswith(str(venv)) and Path(info["path"]).exists()
