"""The ``tokenspeed`` command: kernels, env, bench, check, sim.

Each subcommand is one function below; heavy imports happen inside them so ``tokenspeed --help``
stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

console = Console()
if not console.is_terminal:  # logs and CI: wide enough that tables do not wrap every cell
    console = Console(width=200)


# -- tokenspeed kernels -------------------------------------------------------------------------
def cmd_kernels(args: argparse.Namespace) -> int:
    from tokenspeed_core import get_registry
    from tokenspeed_core._device import capability, default_device, device_name
    from tokenspeed_core._registry import forced_backend

    reg = get_registry()
    device = default_device()
    cap = capability(device)
    entries = []
    for op, spec in sorted(reg.specs.items()):
        sig = _device_signature(spec, device, cap)
        cands = reg.candidates(sig)
        for c in cands:
            entries.append({
                "op": op, "backend": c.impl.backend, "plugin": c.impl.plugin, "priority": c.priority,
                "devices": list(c.impl.devices), "selected": c.selected,
                "reason": c.reason or "", "status": c.impl.status, "doc": c.impl.doc,
                "forced": forced_backend(op)[0] or "",
            })
    failed = [{"plugin": f.name, "stage": f.stage, "error": f.error} for f in reg.failed_plugins]
    if args.json:
        print(json.dumps({"device": device_name(device), "capability": cap, "plugins": reg.plugins,
                          "failed_plugins": failed, "implementations": entries}, indent=2))
        return 0
    title = f"Kernels on {device_name(device)}" + (f" (sm_{cap[0]}{cap[1]})" if cap else "")
    table = Table(title=title + " — for a typical call of each op")
    for col in ("op", "backend", "plugin", "prio", "", "why not / status"):
        table.add_column(col)
    for e in entries:
        mark = "[green]selected[/]" if e["selected"] else ("[dim]ok[/]" if not e["reason"] else "[red]no[/]")
        why = e["reason"] or ""
        if e["status"]:
            why = f"{why} [{e['status']}]" if why else f"[{e['status']}]"
        table.add_row(e["op"], e["backend"], e["plugin"], str(e["priority"]), mark, why)
    console.print(table)
    console.print(f"plugins loaded: {', '.join(reg.plugins) or 'none'}")
    for f in failed:
        console.print(f"[red]plugin {f['plugin']} failed to {f['stage']}:[/] {f['error']}")
    return 0


def _device_signature(spec, device, cap):
    """The signature of the op's first "small" preset (or grid case) on this device."""
    import torch

    case = dict((spec.presets.get("small") or spec.grid("small"))[0])
    if device.type == "cuda":
        for k, v in case.items():  # CPU presets use fp32; a GPU's typical call is bf16
            if v is torch.float32:
                case[k] = torch.bfloat16
    args = spec.make_inputs(case, torch.Generator().manual_seed(0), device)
    return spec.signature(spec.bind(args), cap)


# -- tokenspeed env ------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    import importlib.metadata
    import platform

    import torch

    from tokenspeed_core import get_registry
    from tokenspeed_core._device import default_device, device_name
    from tokenspeed_core._hooks import discover_entry_points

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device_name(default_device())}
    for dist in ("tokenspeed", "tokenspeed-kernels-triton", "tokenspeed-kernels-blackwell", "triton",
                 "nvidia-cutlass-dsl", "pluggy", "cffi"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    reg = get_registry()
    info["entry_points"] = {ep.name: ep.value for ep in discover_entry_points()}
    info["plugins"] = reg.plugins
    info["failed_plugins"] = [{"plugin": f.name, "stage": f.stage, "error": f.error} for f in reg.failed_plugins]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        console.print(f"[bold]{k}[/]: {v}")
    return 0


# -- tokenspeed bench ----------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import Progress

    from tokenspeed_core import get_registry
    from tokenspeed_core._device import default_device
    from tokenspeed_core.bench import get_ceilings, parse_shape, run_bench, write_csv, write_json

    device = torch.device(args.device) if args.device else default_device()
    if args.ceilings:
        c = get_ceilings(device, remeasure=True)
        console.print(f"{c.device}: copy {c.copy_gbps} GB/s (read+write), {c.gemm_dtype} GEMM "
                      f"{c.gemm_tflops} TFLOP/s  (cached for later runs)")
        if not args.ops:
            return 0
    reg = get_registry()
    ops = args.ops or sorted(reg.specs)
    ceilings = get_ceilings(device)
    all_rows = []
    for op in ops:
        spec = reg.spec(op)
        if args.shape:
            cases = [parse_shape(s) for s in args.shape]
        else:
            preset = args.preset or _default_preset(spec, device)
            if preset not in spec.presets:
                console.print(f"[red]{op}: no preset '{preset}'; presets: {sorted(spec.presets)}[/]")
                if len(ops) == 1:
                    return 2
                continue
            cases = spec.presets[preset]
        backends = args.backends.split(",") if args.backends else None
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task(op, total=None)
            rows = run_bench(op, cases, registry=reg, device=device, ceilings=ceilings, backends=backends,
                             iters=args.iters, cuda_graph=args.graph, l2_flush=args.l2_flush,
                             progress=lambda msg, task=task: progress.update(task, description=msg, advance=1))
        all_rows += rows
    _print_bench(all_rows, ceilings)
    if args.json:
        write_json(args.json, all_rows, ceilings)
    if args.csv:
        write_csv(args.csv, all_rows, ceilings)
    return 1 if any(r.error and not r.error.startswith("unsupported") for r in all_rows) else 0


def _default_preset(spec, device) -> str:
    """CPU: "small". GPU: "large" where the op has one, else its first preset after "small"."""
    if device.type == "cpu" or len(spec.presets) == 1:
        return "small" if "small" in spec.presets else next(iter(spec.presets))
    if "large" in spec.presets:
        return "large"
    return next(p for p in spec.presets if p != "small")


def _print_bench(rows, ceilings) -> None:
    table = Table(title=f"{ceilings.device}: copy {ceilings.copy_gbps} GB/s, {ceilings.gemm_dtype} GEMM "
                        f"{ceilings.gemm_tflops} TFLOP/s (measured)")
    for col in ("op", "backend", "case", "median µs", "p10–p90", "TFLOP/s", "GB/s", "% copy", "% GEMM"):
        table.add_column(col, justify="right" if col not in ("op", "backend", "case") else "left")
    for r in rows:
        if r.error:
            table.add_row(r.op, r.backend, r.case, f"[red]{r.error[:60]}[/]", "", "", "", "", "")
            continue
        table.add_row(r.op, r.backend, r.case, f"{r.median_us:.1f}", f"{r.p10_us:.0f}–{r.p90_us:.0f}",
                      f"{r.tflops:.2f}", f"{r.gbps:.0f}", f"{r.pct_copy:.0f}", f"{r.pct_gemm:.0f}")
    console.print(table)
    if rows:
        console.print(f"[dim]repro: {rows[0].repro}[/]")


# -- tokenspeed check ----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from tokenspeed_core import get_registry
    from tokenspeed_core.testing import check_plugin

    reg = get_registry()
    device = torch.device(args.device) if args.device else None
    ops = args.ops.split(",") if args.ops else None
    plugins = [args.plugin] if args.plugin != "all" else list(reg.plugins)
    ok = True
    for plugin in plugins:
        report = check_plugin(plugin, ops=ops, registry=reg, size=args.size, device=device, seed=args.seed)
        color = "green" if report.ok else "red"
        console.print(f"[bold {color}]{plugin}: {'PASS' if report.ok else 'FAIL'}[/]")
        console.print(report.format(verbose=args.verbose), markup=False, highlight=False)
        ok &= report.ok
    return 0 if ok else 1


# -- tokenspeed sim ------------------------------------------------------------------------------
def _add_sim(sub) -> None:
    p = sub.add_parser("sim", help="replay agent/Mooncake traces through the real scheduler (no GPU)")
    try:
        from tokenspeed.sim import cli as sim_cli
    except ImportError as exc:  # the scheduler extension is not built
        reason = f"tokenspeed sim is unavailable: {exc}"
        p.set_defaults(func=lambda a: _fail(reason))
        return
    sim_cli.add_arguments(p)
    p.set_defaults(func=sim_cli.run)


def _fail(msg: str) -> int:
    console.print(f"[red]{msg}[/]")
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenspeed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kernels", help="every op, every implementation, which one is selected here and why")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("env", help="versions, device, plugins, plugin failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("bench", help="benchmark every backend that supports a shape, against the device's ceilings")
    p.add_argument("ops", nargs="*", help="op names (default: every op)")
    p.add_argument("--preset", help="a named shape set of the op (default: 'small' on CPU)")
    p.add_argument("--shape", action="append", help="one case as key=value,... (repeatable); lists as a/b/c")
    p.add_argument("--backends", help="comma-separated backends (default: every one that supports the shape)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    p.add_argument("--l2-flush", choices=("write", "read"), default="write",
                   help="flush L2 before each call with a write (default, as triton's do_bench: leaves dirty "
                        "lines that a streaming kernel writes back) or a read (clean lines)")
    p.add_argument("--ceilings", action="store_true", help="(re)measure copy bandwidth and GEMM rate and cache them")
    p.add_argument("--json", help="write rows and ceilings to this JSON file")
    p.add_argument("--csv", help="write rows to this CSV file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", help="run the conformance kit over a plugin's kernels")
    p.add_argument("plugin", help="plugin (entry-point) name, or 'all'")
    p.add_argument("--ops", help="comma-separated ops (default: all the plugin implements)")
    p.add_argument("--size", default=None, help="grid: small (default on CPU) or full (default on GPU)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, help="fix the random seed (default: fresh, printed per case)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_check)

    _add_sim(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", "x") is None:
        import torch

        args.size = "full" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else "small"
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
