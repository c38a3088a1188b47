"""``slmops build``: base model + adapters -> a multi-adapter ONNX bundle for one target."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from slmops.targets import TARGETS


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_summary(bundle_dir: Path, console: Any) -> None:
    """Files, adapters and validation figures of a bundle, as rich tables."""
    from rich.table import Table

    from slmops.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    t = manifest.target
    console.print(f"[bold]{bundle_dir}[/]  target {t.name} ({t.execution_provider}, {t.precision}, adapters {t.adapter_dtype})  "
                  f"base {manifest.base_model.name} sha256 {manifest.base_model.sha256[:12]}")
    files = Table("file", "size", "sha256", title="files")
    total = 0
    for rel, sha in manifest.files.items():
        size = (bundle_dir / rel).stat().st_size if (bundle_dir / rel).is_file() else 0
        total += size
        files.add_row(rel, human_size(size), sha[:12])
    files.add_row("[bold]total[/]", f"[bold]{human_size(total)}[/]", "")
    console.print(files)
    abi = manifest.lora_template
    if manifest.merged_adapter:
        console.print(f"merged adapter: [bold]{manifest.merged_adapter}[/] (no LoRA inputs)")
    else:
        console.print(f"adapter ABI v{abi.abi_version}: {len(abi.inputs)} LoRA inputs over {abi.num_layers} layers, modules {abi.modules}, {abi.dtype}")
    validation = manifest.validation
    if manifest.adapters:
        table = Table("adapter", "rank", "alpha", "modules", "metric", "bundle", "pytorch", "drop (pts)", "agreement", title="adapters")
        for name, info in manifest.adapters.items():
            m = info.eval_metrics
            table.add_row(name, str(info.rank), f"{info.alpha:g}", ",".join(info.target_modules), str(m.get("metric", "-")),
                          _fmt(m.get("bundle")), _fmt(m.get("pytorch")), _fmt(m.get("drop_points")),
                          _fmt(m.get("agreement", m.get("token_agreement"))))
        console.print(table)
    search = (manifest.build or {}).get("search")
    if search:
        from slmops_build.build import print_search_table

        print_search_table(search, console)
    if "skipped" in validation:
        console.print(f"validation: [yellow]unverified[/] (skipped: {validation['skipped']})")
    elif validation:
        ppl = validation.get("perplexity") or {}
        ppl_text = ", ".join(f"{k} {v}" for k, v in ppl.items() if k not in ("texts", "tokens")) if ppl else "-"
        state = validation.get("status") or ("passed" if validation.get("passed") else "failed")
        status = {"passed": "[green]passed[/]", "unverified": "[yellow]unverified[/]"}.get(state, f"[red]{state}[/]")
        extra = f" ({'; '.join(validation['unverified'])})" if validation.get("unverified") else ""
        console.print(f"validation {status}{extra}: perplexity {ppl_text}; {validation.get('seconds', '-')} s")
        for name, entry in (validation.get("test_rows") or {}).get("adapters", {}).items():
            console.print(f"  {name} on its run's test rows: {entry['metric']} {entry['bundle']:.3f} vs PyTorch "
                          f"{entry['pytorch']:.3f}, {entry['rows_same']}/{entry['rows']} answers identical")
        for name, entry in validation.get("adapters", {}).items():
            if "noise_margin_points" in entry:
                floor = entry.get("min_detectable_drop_points")
                console.print(f"  {name}: {entry['rows']} rows, drop {entry['drop_points']} points, noise margin "
                              f"{entry['noise_margin_points']} points" + (f"; this gate resolves drops >= {floor} points" if floor else ""))


def summary_console(stderr: bool = False) -> Any:
    """A rich console on stdout (or stderr); wide lines when it is a file or pipe."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=160)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@click.command("build", context_settings={"max_content_width": 120})
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML with any of these options (adapters: {name: path}, extra_options: {k: v}).")
@click.option("--target", type=str, default=None, help=f"target profile: {', '.join(sorted(TARGETS))} (default cpu)")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None, help="olive-style: cpu -> cpu target, gpu -> cuda target")
@click.option("--provider", type=str, default=None, help="olive-style: CPUExecutionProvider, CUDAExecutionProvider")
@click.option("--precision", type=str, default=None, help="override the target's base precision: fp32, fp16, int8, int4")
@click.option("-m", "--model_name_or_path", type=str, default=None, help="local HF folder, hub id, or 'default'")
@click.option("--adapter", "adapter", multiple=True,
              help="NAME=PATH of a PEFT adapter folder or train run folder (repeatable); a bare PATH is named after its run folder")
@click.option("--merge", type=str, default=None, help="merge this adapter into the weights (one adapter, no LoRA inputs)")
@click.option("--lora_modules", type=str, default=None, help="comma list of modules with runtime LoRA inputs (default all linear)")
@click.option("-o", "--output_path", type=str, default=None, help="bundle folder (default dist/bundles/<target>)")
@click.option("--overwrite/--no-overwrite", default=None, help="replace an existing bundle")
@click.option("--extra_option", "extra_option", multiple=True, help="quantizer / model builder option KEY=VALUE (repeatable): offsets=folded|exact|none, accuracy_level=4|1, "
              "head_accuracy_level, block_size=32, embedding_bits=8|0; quantizer=builder takes any builder option, "
              "e.g. algo_config=k_quant")
@click.option("--validate/--no-validate", "validate", default=None, help="validate the bundle (default on)")
@click.option("--validate_rows", type=int, default=None, help="eval rows per adapter for validation (default: all; the summary prints the noise margin)")
@click.option("--allow-unverified", "--allow_unverified", "allow_unverified", is_flag=True, default=None,
              help="write the bundle even when checks cannot run here (e.g. a cuda bundle on a CPU machine); it is marked unverified")
@click.option("--validate_max_new_tokens", type=int, default=None, help="tokens generated per validation row")
@click.option("--max_accuracy_drop", type=float, default=None,
              help="fail above this accuracy/ROUGE-L drop in points, when beyond the paired row-flip noise (default 1)")
@click.option("--max_ppl_increase", type=float, default=None, help="fail above this perplexity increase in percent (default 10)")
@click.option("--min_agreement", type=float, default=None,
              help="fail when fewer than this fraction of an adapter's eval rows get PyTorch's own answer (default 0.97)")
@click.option("--search/--no-search", "search", default=None,
              help="measure candidate quantizations here (accuracy level, fp32 last layers, block size) and keep the "
                   "fastest within the budget; the table goes into bundle.json")
@click.option("--test_check", "--test-check", "test_check", is_flag=True, default=None,
              help="also fail unless every adapter is within --max_accuracy_drop points of PyTorch on its run's test rows")
@click.option("--json", "as_json", is_flag=True, default=None, help="print the bundle's manifest (bundle.json) as JSON on stdout")
def build_command(config_path: Path | None, as_json: bool | None = None, **options: Any) -> None:
    """Build a multi-adapter ONNX bundle: model/, adapters/<name>.onnx_adapter, bundle.json.

    Example: slmops build --target cpu --adapter tone=runs/tone --adapter extract=runs/extract
    """
    from slmops_build.build import build_bundle, build_config, load_build_yaml
    from slmops_build.export import ExportError
    from slmops_build.validate import BuildValidationError

    values: dict[str, Any] = load_build_yaml(config_path) if config_path else {}
    explicit = {k: v for k, v in options.items() if v is not None and v != ()}
    if "adapter" in explicit:
        values.pop("adapters", None)
    if "extra_option" in explicit and isinstance(values.get("extra_options"), dict):
        # CLI options add to (and win over) the YAML's.
        from slmops_build.quantize import parse_extra_options

        merged = {**values.pop("extra_options"), **parse_extra_options(explicit.pop("extra_option"))}
        explicit["extra_options"] = merged
    values.update(explicit)
    config = build_config(values, source=str(config_path) if config_path else "")
    err = summary_console(stderr=True)
    try:
        out = build_bundle(config, console=err)
    except BuildValidationError as exc:
        if exc.status == "unverified":
            err.print("[yellow]bundle unverified[/]: these checks could not run here, so nothing was written "
                      "(pass --allow-unverified to write it marked unverified):")
            for reason in exc.failures:
                err.print(f"  - {reason}")
            sys.exit(1)
        err.print("[red]bundle validation failed[/]; nothing was written:")
        for failure in exc.failures:
            err.print(f"  - {failure}")
        for name, entry in exc.report.get("adapters", {}).items():
            figures = {k: entry[k] for k in ("metric", "bundle", "pytorch", "drop_points", "noise_margin_points", "agreement", "rows")
                       if k in entry}
            err.print(f"  adapter {name}: {figures}")
        if exc.report.get("perplexity"):
            err.print(f"  perplexity: {exc.report['perplexity']}")
        sys.exit(1)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        import json

        from slmops.bundle import read_manifest

        click.echo(json.dumps({"bundle": str(out), **read_manifest(out).model_dump()}, indent=2, default=str))
        return
    print_summary(out, summary_console())
