"""Triton kernel tests.

Without a CUDA device (CI) the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is
set here, before any test module imports (and so defines) a Triton kernel. With a GPU the
variable is left alone and the kernels compile for it. Without the ``triton`` package the whole
folder is skipped.
"""

from __future__ import annotations

import importlib.util
import os

collect_ignore_glob: list[str] = []

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]  # nothing here can run without triton
else:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency of the project
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="CPU run needs TRITON_INTERPRET=1")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


if not collect_ignore_glob:
    import pytest

    @pytest.fixture(scope="session")
    def registry():
        """A registry with the reference and the Triton plugin, registered as an entry point would."""
        import tokenspeed_core
        from tokenspeed_kernels_triton import plugin

        reg = tokenspeed_core.build_registry(entry_points=False)
        with reg.registering_as("triton"):
            plugin.tokenspeed_register_kernels(registry=reg)
        return reg
