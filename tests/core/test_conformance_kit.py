"""The kit itself: in-out roles start kernel and reference from the same contents, crashes are
reported per case, and a backend that supports nothing does not pass."""

from __future__ import annotations

import torch

import tokenspeed_core as tc
from tokenspeed_core.ops import kv_cache_write as kvw
from tokenspeed_core.testing import check_impl


def _registry_with(fn, backend, **kw):
    reg = tc.build_registry(entry_points=False)
    with reg.registering_as("t"):
        reg.register(kw.pop("op", "kv_cache_write"), fn, backend=backend, **kw)
    return reg


def _check(reg, backend, op="kv_cache_write"):
    return check_impl(reg.backend(op, backend), registry=reg, size="small", device="cpu", bad_inputs=False)


def test_inout_clobbering_an_unaddressed_slot_fails_even_with_nan():
    def clobber(kv, slot_mapping, kv_cache, kv_scale=1.0):
        kvw.reference(kv, slot_mapping, kv_cache, kv_scale)
        used = set(slot_mapping.tolist())
        free = next((s for s in range(kv_cache.shape[0] * kv_cache.shape[1]) if s not in used), None)
        if free is not None:
            kv_cache.view(-1, kv_cache.shape[-1])[free, 0] = float("nan")

    rep = _check(_registry_with(clobber, "clobber"), "clobber")
    assert not rep.ok and "not addressed by slot_mapping were modified" in rep.format()


def test_inout_correct_kernel_passes_and_missing_write_fails():
    assert _check(_registry_with(kvw.reference, "ok"), "ok").ok

    def skip_first(kv, slot_mapping, kv_cache, kv_scale=1.0):
        kvw.reference(kv[1:], slot_mapping[1:], kv_cache, kv_scale)

    rep = _check(_registry_with(skip_first, "lazy"), "lazy")
    assert not rep.ok and "written element(s) off" in rep.format()


def test_crash_is_an_error_row_and_nothing_supported_fails():
    def crash(**kw):
        raise RuntimeError("kernel exploded")

    rep = _check(_registry_with(crash, "crash"), "crash")
    assert not rep.ok and "RuntimeError: kernel exploded" in rep.format()
    reg = _registry_with(kvw.reference, "never", supports=lambda sig: "supports nothing")
    rep = _check(reg, "never")
    assert not rep.ok and "supports none of the grid" in rep.format()


def test_in_out_role_must_be_passed():
    args = kvw.SPEC.make_inputs(dict(T=2, D=4, page_size=2, pages=2, dtype=torch.float32),
                                torch.Generator().manual_seed(0), "cpu")
    del args["kv_cache"]
    try:
        kvw.SPEC.bind(args)
    except tc.ArgumentError as exc:
        assert "'kv_cache': in-out tensor is required" in str(exc)
    else:
        raise AssertionError("missing in-out tensor accepted")


def test_unavailable_backends_are_listed_not_failed_but_cannot_pass_alone():
    from tokenspeed_core.testing import check_plugin

    reg = tc.build_registry(entry_points=False)
    with reg.registering_as("p"):
        reg.register("kv_cache_write", kvw.reference, backend="p_ok")
        reg.register("kv_cache_write", kvw.reference, backend="p_later", unavailable="needs hardware X")
    rep = check_plugin("p", registry=reg, size="small", device="cpu")
    assert rep.ok, rep.format()
    assert "not checked, unavailable: needs hardware X" in rep.format()
    reg.unregister_plugin("p")
    with reg.registering_as("q"):
        reg.register("kv_cache_write", kvw.reference, backend="q_later", unavailable="needs hardware X")
    assert not check_plugin("q", registry=reg, size="small", device="cpu").ok


def test_attention_grids_catch_a_kernel_that_assumes_a_positive_scale():
    """The attention ops' grids hold a negative and a zero scale: a kernel that takes the row max
    before scaling without handling the sign (here: the reference with |scale|, and with the
    scale's zero replaced by 1) fails there and nowhere else."""
    from tokenspeed_core.ops import mla_decode as dec
    from tokenspeed_core.ops import mla_prefill as pre

    for spec, name in ((dec, "mla_decode"), (pre, "mla_prefill")):
        def sign_blind(*args, softmax_scale, _ref=spec.reference, **kw):
            return _ref(*args, softmax_scale=abs(softmax_scale) or 1.0, **kw)

        rep = _check(_registry_with(sign_blind, "sign_blind", op=name), "sign_blind", op=name)
        failed = [r.label for r in rep.results if r.status != "pass"]
        assert failed and all("scale=" in c for c in failed), rep.format()
