"""Plugin hooks (pluggy) and discovery through the ``tokenspeed.kernels`` entry-point group.

A plugin is a module (or object) with functions marked ``@tokenspeed_core.hookimpl``. The core
calls each plugin's hooks separately: one that fails to import, or raises while registering, is
reported (a warning, and an entry in ``registry.failed_plugins``) and skipped, and whatever it had
registered before failing is removed. It never takes the host down.

Environment:
  TOKENSPEED_PLUGINS=a,b            load only these entry points (allow list)
  TOKENSPEED_DISABLE_PLUGINS=a,b    never load these (deny list; wins over the allow list)
"""

from __future__ import annotations

import importlib.metadata
import os
import traceback
import warnings
from typing import Any

import pluggy

from ._errors import PluginError
from ._registry import FailedPlugin, Registry

PROJECT = "tokenspeed"
ENTRY_POINT_GROUP = "tokenspeed.kernels"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class KernelHookSpecs:
    """The contract between the core and a kernel plugin."""

    @hookspec
    def tokenspeed_register_ops(self, registry: Registry) -> None:
        """Define new op families with ``registry.add_op(spec)``.

        Called for every plugin before any ``tokenspeed_register_kernels``, so a plugin may
        implement ops that another plugin defines. Most plugins do not need this hook.
        """

    @hookspec
    def tokenspeed_register_kernels(self, registry: Registry) -> None:
        """Register implementations with ``registry.register(op, fn, backend=..., ...)``.

        Must be cheap and must not touch a GPU: decide availability from installed packages
        and declare device/capability requirements on each registration; heavy work (compiling,
        loading a library) belongs in the first call of the kernel, not here. Raising here marks
        the plugin failed and removes what it registered.
        """


def _split_env(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def discover_entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in eps:  # the same distribution found twice on sys.path counts once
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda e: e.name)


def _record_failure(registry: Registry, name: str, stage: str, exc: BaseException) -> None:
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    registry.failed_plugins.append(FailedPlugin(name, stage, detail))
    warnings.warn(f"tokenspeed: plugin '{name}' failed to {stage} and was skipped: {detail}",
                  RuntimeWarning, stacklevel=3)


def load_plugins(registry: Registry, builtins: dict[str, Any] | None = None,
                 entry_points: bool = True) -> pluggy.PluginManager:
    """Fill ``registry`` from the built-in plugins and every allowed entry point."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(KernelHookSpecs)
    for name, plugin in (builtins or {}).items():
        pm.register(plugin, name=name)
    if entry_points:
        allow, deny = _split_env("TOKENSPEED_PLUGINS"), _split_env("TOKENSPEED_DISABLE_PLUGINS")
        for ep in discover_entry_points():
            if (allow is not None and ep.name not in allow) or (deny and ep.name in deny):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                _record_failure(registry, ep.name, "import", exc)
    _call_each(pm, registry, "tokenspeed_register_ops")
    _call_each(pm, registry, "tokenspeed_register_kernels")
    return pm


def _call_each(pm: pluggy.PluginManager, registry: Registry, hook_name: str) -> None:
    failed = {f.name for f in registry.failed_plugins}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        name = impl.plugin_name
        if name in failed:
            continue
        try:
            with registry.registering_as(name):
                impl.function(registry=registry)
            if name not in registry.plugins:
                registry.plugins.append(name)
        except Exception as exc:
            registry.unregister_plugin(name)
            if name in registry.plugins:
                registry.plugins.remove(name)
            _record_failure(registry, name, "register", exc)
            failed.add(name)


__all__ = ["ENTRY_POINT_GROUP", "KernelHookSpecs", "PluginError", "hookimpl", "hookspec",
           "load_plugins", "discover_entry_points"]
