"""The conformance kit: what a plugin author runs before publishing.

For each op a backend implements: generated inputs over the op's shape grid (fresh random values,
seed reported for reproduction), outputs poisoned before the call so unwritten elements fail,
inputs checked for unintended writes, results compared with the op's reference computed in float64
under per-dtype tolerances, and bad inputs that must raise ``ArgumentError``.

From a plugin author's pytest suite::

    from tokenspeed_core.testing import check_backend
    def test_my_kernels():
        report = check_backend("mla_decode", "mybackend", size="small")
        assert report.ok, report.format()

or per case with ``conformance_cases(op, size)`` + ``assert_case(op, backend, case)``.
From a shell: ``tokenspeed check PLUGIN``.
"""

from ._conformance import (
    BackendReport,
    CaseResult,
    PluginReport,
    assert_case,
    check_backend,
    check_impl,
    check_plugin,
    conformance_cases,
    run_bad_inputs,
    run_case,
)

__all__ = [
    "BackendReport", "CaseResult", "PluginReport", "assert_case", "check_backend", "check_impl",
    "check_plugin", "conformance_cases", "run_bad_inputs", "run_case",
]
