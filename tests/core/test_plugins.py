"""Plugins installed as real packages: discovery, selection, failure isolation, allow/deny lists,
and the conformance kit (`tokenspeed check`) passing a good plugin and failing wrong ones."""

from __future__ import annotations

import json

import pytest
from plugin_packages import REPO, pip_install_target, run_with, write_plugin

REFERENCE_WRAPPER = """
import tokenspeed_core
from tokenspeed_core.ops import mla_decode as _m

@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry):
    registry.register("mla_decode", {fn}, backend="{name}", priority=tokenspeed_core.Priority.PLUGIN)

{body}
"""

OFF_BY_A_LITTLE = REFERENCE_WRAPPER.format(name="offby", fn="kernel", body="""
def kernel(**kw):
    _m.reference(**kw)
    kw["out"].mul_(1.003)   # 0.3%: inside bf16 tolerance, far outside fp32's
""")

PARTIAL_WRITE = REFERENCE_WRAPPER.format(name="partial", fn="kernel", body="""
import torch
def kernel(q, kv_cache, page_table, cache_seqlens, out, lse, **p):
    full = torch.empty_like(out)
    _m.reference(q, kv_cache, page_table, cache_seqlens, full, lse, **p)
    out[:, :, :, : out.shape[-1] - 1] = full[..., :-1]   # forgets the last column
""")

MUTATES_INPUT = REFERENCE_WRAPPER.format(name="mutator", fn="kernel", body="""
def kernel(**kw):
    _m.reference(**kw)
    kw["q"].mul_(0.5)
""")

IMPORT_FAILS = "import a_module_that_does_not_exist\n"

REGISTER_FAILS = """
import tokenspeed_core
from tokenspeed_core.ops import mla_decode as _m

@tokenspeed_core.hookimpl
def tokenspeed_register_kernels(registry):
    registry.register("mla_decode", _m.reference, backend="halfway", priority=500)
    raise RuntimeError("boom while registering")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    target = root / "site"
    dists = [
        REPO / "examples" / "tokenspeed-example-plugin",
        write_plugin(root, "offby", OFF_BY_A_LITTLE),
        write_plugin(root, "partial", PARTIAL_WRITE),
        write_plugin(root, "mutator", MUTATES_INPUT),
        write_plugin(root, "importfails", IMPORT_FAILS),
        write_plugin(root, "registerfails", REGISTER_FAILS),
    ]
    pip_install_target(target, *dists)
    return target


def _kernels_json(target, env=None):
    r = run_with(target, "-m", "tokenspeed", "kernels", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_example_plugin_discovered_and_selected(installed):
    info = _kernels_json(installed, env={"TOKENSPEED_PLUGINS": "example"})
    assert info["plugins"] == ["reference", "example"]
    rows = [e for e in info["implementations"] if e["op"] == "mla_decode"]
    selected = [e for e in rows if e["selected"]]
    assert [(e["backend"], e["plugin"]) for e in selected] == [("example", "example")]


def test_broken_plugins_are_reported_not_fatal(installed):
    info = _kernels_json(installed)
    failed = {f["plugin"]: f for f in info["failed_plugins"]}
    assert failed["importfails"]["stage"] == "import"
    assert "a_module_that_does_not_exist" in failed["importfails"]["error"]
    assert failed["registerfails"]["stage"] == "register"
    assert "boom while registering" in failed["registerfails"]["error"]
    backends = {e["backend"] for e in info["implementations"]}
    assert "halfway" not in backends  # what it registered before failing was removed
    assert {"example", "offby", "partial", "reference"} <= backends
    env = run_with(installed, "-m", "tokenspeed", "env", "--json")
    assert env.returncode == 0 and "importfails" in env.stdout


def test_allow_and_deny_lists(installed):
    info = _kernels_json(installed, env={"TOKENSPEED_DISABLE_PLUGINS": "example,offby,partial,mutator"})
    backends = {e["backend"] for e in info["implementations"]}
    assert not backends & {"example", "offby", "partial", "mutator"}
    info = _kernels_json(installed, env={"TOKENSPEED_PLUGINS": "offby", "TOKENSPEED_DISABLE_PLUGINS": "offby"})
    assert info["plugins"] == ["reference"] and not info["failed_plugins"]


def test_check_passes_the_example_plugin(installed):
    r = run_with(installed, "-m", "tokenspeed", "check", "example", env={"TOKENSPEED_PLUGINS": "example"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "example: PASS" in r.stdout and "skip" in r.stdout  # fp8 / tiny pages: declared unsupported


@pytest.mark.parametrize("plugin,needle", [
    ("offby", "out of tolerance"),
    ("partial", "NaN/inf (unwritten"),
    ("mutator", "input 'q' was modified"),
])
def test_check_fails_wrong_plugins(installed, plugin, needle):
    r = run_with(installed, "-m", "tokenspeed", "check", plugin, env={"TOKENSPEED_PLUGINS": plugin})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{plugin}: FAIL" in r.stdout and needle in r.stdout


def test_check_reports_failed_plugin(installed):
    r = run_with(installed, "-m", "tokenspeed", "check", "importfails")
    assert r.returncode == 1 and "failed to import" in r.stdout
