"""``slmops targets``: the build targets (slmops.targets.TARGETS) and their settings."""

from __future__ import annotations

import dataclasses
import json

import click


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="print the targets as JSON")
def targets_command(as_json: bool) -> None:
    """List the build targets (`slmops build --target NAME`) with their provider, precision and settings."""
    from slmops.targets import DEVICE_TO_TARGET, PROVIDER_TO_TARGET, TARGETS

    rows = {name: dataclasses.asdict(t) for name, t in TARGETS.items()}
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "provider", "precision", "adapters", "builder options", "session options", title="build targets")
    for name, t in rows.items():
        table.add_row(name, t["provider"], t["precision"], t["adapter_dtype"],
                      ", ".join(f"{k}={v}" for k, v in t["builder_options"].items()) or "-",
                      ", ".join(f"{k}={v}" for k, v in t["session_options"].items()) or "-")
    console = Console(width=160)
    console.print(table)
    console.print(f"olive --device: {DEVICE_TO_TARGET}; --provider: {PROVIDER_TO_TARGET}; --precision overrides a target's")
