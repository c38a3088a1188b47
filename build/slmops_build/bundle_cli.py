"""``slmops bundle inspect|verify DIR``: read a bundle's manifest; re-check every file and adapter,
and run each adapter with the server's runtime (slmops.runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


@click.group("bundle")
def bundle_group() -> None:
    """Inspect and verify bundles built by `slmops build`."""


@bundle_group.command("inspect")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print bundle.json as JSON")
def inspect_command(bundle_dir: Path, as_json: bool) -> None:
    """Show a bundle's manifest: target, base model, files, adapter ABI, adapters, validation."""
    from slmops.bundle import BundleError, read_manifest
    from slmops_build.cli import print_summary, summary_console

    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(manifest.model_dump(), indent=2))
        return
    print_summary(bundle_dir, summary_console())


def verify_bundle(bundle_dir: Path, load: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes): re-hash every file, check the ABI and every adapter, then load the model
    and every adapter with the server's runtime and decode a token with each."""
    import hashlib

    from slmops import contract
    from slmops.adapter_format import read_file
    from slmops.bundle import BundleError, read_manifest, verify_files
    from slmops_build.export import read_template, shape_fits

    notes: list[str] = []
    try:
        manifest = read_manifest(bundle_dir)
    except (BundleError, ValueError) as exc:
        return [str(exc)], notes
    problems = verify_files(bundle_dir, manifest)
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - {"bundle.json"}
    problems += [f"{rel}: not listed in bundle.json" for rel in sorted(on_disk - set(manifest.files))]
    model_dir = bundle_dir / manifest.model_dir
    template = manifest.lora_template
    try:
        graph_inputs = {i.name: i.shape for i in read_template(model_dir).inputs}
        want = {i.name: i.shape for i in template.inputs}
        if set(graph_inputs) != set(want):
            missing = sorted(set(want) - set(graph_inputs))
            extra = sorted(set(graph_inputs) - set(want))
            problems.append(f"model graph's LoRA inputs differ from the ABI in bundle.json (missing {missing[:3]}, extra {extra[:3]})")
        # the graph may declare a dim symbolic (B's columns: its default broadcasts) where the ABI fixes it
        bad = [n for n, shape in want.items() if n in graph_inputs and not shape_fits(graph_inputs[n], shape)]
        if bad:
            problems.append(f"model graph's LoRA input {bad[0]} has shape {graph_inputs[bad[0]]}, the ABI says {want[bad[0]]}")
    except Exception as exc:  # noqa: BLE001 - unreadable graph
        problems.append(f"{manifest.model_dir}/model.onnx cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
    for name, info in manifest.adapters.items():
        path = bundle_dir / info.file
        if not path.is_file():
            problems.append(f"adapter {name}: {info.file} missing")
            continue
        data = read_file(path)  # hashed and checked from one read
        if hashlib.sha256(data).hexdigest() != info.sha256:
            problems.append(f"adapter {name}: sha256 differs from bundle.json")
        problems += [f"adapter {name}: {p}" for p in contract.check_adapter_bytes(data, template).problems]
    if problems or not load:
        return problems, notes
    import onnxruntime as ort

    from slmops.runtime import LocalModel
    from slmops.runtime.runner import session_providers

    try:
        session_providers(manifest.target.execution_provider, ort.get_available_providers())
    except ValueError as exc:
        notes.append(f"not loaded: {exc}")
        return problems, notes
    try:
        model = LocalModel(model_dir, template, execution_provider=manifest.target.execution_provider)
        model.generate([0, 1], 1)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure is the finding
        return [*problems, f"the model cannot be loaded or run: {type(exc).__name__}: {exc}"], notes
    for name, info in manifest.adapters.items():
        try:
            model.load_adapter(name, bundle_dir / info.file)
            model.generate([0, 1], 1, adapter=name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"adapter {name}: cannot be loaded or run ({type(exc).__name__}: {exc})")
        model.unload_adapter(name)
    notes.append(f"model and {len(manifest.adapters)} adapter(s) loaded and run with the server's runtime")
    return problems, notes


@bundle_group.command("verify")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--no-load", is_flag=True, help="only re-hash files and check the ABI; do not load the model")
def verify_command(bundle_dir: Path, no_load: bool) -> None:
    """Re-hash every file, check the adapter ABI, load every adapter; exit 1 listing problems."""
    from slmops_build.cli import summary_console

    console: Any = summary_console()
    problems, notes = verify_bundle(bundle_dir, load=not no_load)
    for note in notes:
        console.print(note)
    if problems:
        console.print(f"[red]{bundle_dir}: {len(problems)} problem(s)[/]")
        for problem in problems:
            console.print(f"  - {problem}")
        sys.exit(1)
    console.print(f"[green]{bundle_dir}: ok[/]")
