"""``slmops train``: every TrainConfig field is a CLI option of the same name (olive finetune's)."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from slmops.errors import SlmopsUsageError
from slmops_train.config import TrainConfig, build_config, configs_from_yaml
from slmops_train.olive import REFUSED, apply_olive_options, explain_unknown, olive_finetune_options

SHORT_ALIASES = {"model_name_or_path": "-m", "data_name": "-d", "output_path": "-o"}


def _click_type(annotation: Any) -> tuple[Any, bool, bool]:
    """(click type, is_flag, multiple) for a pydantic field annotation."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) in (typing.Union, types.UnionType) and args else annotation
    if base is bool:
        return bool, True, False
    if get_origin(base) is list:
        return str, False, True
    if get_origin(base) is Literal:
        return click.Choice([str(a) for a in get_args(base)]), False, False
    return {int: int, float: float}.get(base, str), False, False


def config_options(func: Any) -> Any:
    """Decorate ``func`` with one option per TrainConfig field; unset options stay None."""
    for name, field in reversed(list(TrainConfig.model_fields.items())):
        ctype, is_flag, multiple = _click_type(field.annotation)
        decls = [f"--{name}"] + ([SHORT_ALIASES[name]] if name in SHORT_ALIASES else [])
        shown = _default_text(field)
        help_text = (field.description or "") + (f"  [default: {shown}]" if shown is not False else "")
        if is_flag:
            func = click.option(f"--{name}/--no-{name}", default=None, help=help_text)(func)
        else:
            func = click.option(*decls, type=ctype, multiple=multiple, default=None, help=help_text)(func)
    return func


def _default_text(field: Any) -> str | bool:
    """The TrainConfig default as --help shows it (the options themselves default to None = unset)."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return False
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _explicit(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None and v != ()}


@click.command("train", context_settings={"max_content_width": 120})
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML with any of these options, and optionally `adapters:` name -> options for several adapters.")
@click.option("--search", "search_path", type=click.Path(path_type=Path), default=None,
              help="Hyperparameter search YAML (optuna; params:, or the guide's search_strategy/search_space): trains N trials and keeps the best adapter.")
@click.option("--only", "only", multiple=True, help="With -c: train only these adapters of the config (repeatable).")
@config_options
@olive_finetune_options
def train_command(config_path: Path | None, search_path: Path | None, only: tuple[str, ...], **options: Any) -> None:
    """Fine-tune LoRA/QLoRA adapters; writes <out>/{adapter/, model -> base, run.json, loss_curve.png}
    (<out> = --output_path, default runs/<name>). `slmops finetune` is the same command.

    Booleans take olive's forms too: --gradient_checkpointing, --gradient_checkpointing true/false.

    Example: slmops train --data_files examples/tone/train.jsonl --text_template "{phrase} -> {tone}" --max_steps 60
    """
    from rich.console import Console

    console = Console(stderr=True)
    options = apply_olive_options(options)
    as_json, dry_run, save_config = (bool(options.pop(k, None)) for k in ("as_json", "dry_run", "save_config_file"))
    overrides = _explicit(options)
    if search_path is not None:
        from slmops_train.search import run_search

        run_search(search_path, overrides, config_path)
        return
    configs = configs_from_yaml(config_path, overrides) if config_path else [build_config(overrides)]
    if only:
        names = [c.run_name() for c in configs]
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SlmopsUsageError("--only", f"{unknown} not in {config_path}; choose from {names}")
        configs = [c for c in configs if c.run_name() in only]
    if dry_run:
        for cfg in configs:
            click.echo(f"# {cfg.run_name()}: would write {cfg.run_dir()}\n{_config_yaml(cfg)}")
        return
    from slmops.models import go_offline_if_hub_unreachable, is_default_model, resolve_model_path

    hub_ids = [c.data_name for c in configs if c.data_name and not Path(c.data_name).exists()]
    hub_ids += [c.model_name_or_path for c in configs
                if not is_default_model(c.model_name_or_path) and not Path(c.model_name_or_path).exists()]
    if hub_ids and go_offline_if_hub_unreachable():
        for cfg in configs:
            if cfg.data_name and cfg.data_name in hub_ids and not _dataset_cached(cfg.data_name):
                raise SlmopsUsageError("--data_name", f"'{cfg.data_name}' is a Hugging Face hub dataset and the hub cannot "
                                       "be reached from here; pass local files: --data_name json --data_files FILE")
    for model in dict.fromkeys(c.model_name_or_path for c in configs):
        resolve_model_path(model)  # a hub id offline fails here in a second, before torch is imported
    from slmops_train.recipe import train

    summaries = []
    for cfg in configs:
        result = train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        if save_config:
            (result.run_dir / "config.yaml").write_text(_config_yaml(cfg))
        summaries.append({"name": cfg.run_name(), "run_dir": str(result.run_dir), "adapter": str(result.adapter_dir),
                          "model": str(result.run_dir / "model"), "metrics": result.metrics,
                          "performance": result.record["performance"]})
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        perf = result.record["performance"]
        console.print(
            f"[green]done[/] {cfg.run_name()}: {result.adapter_dir}  {perf['s_per_step']} s/step, "
            f"{perf['tokens_per_s']} tok/s  {shown}"
        )
    if as_json and summaries:
        import json

        click.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2, default=str))


def _dataset_cached(name: str) -> bool:
    """Whether ``datasets`` has ``owner/name`` in its cache (then it loads offline)."""
    root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets")
    return (root / name.replace("/", "___")).is_dir()


def _config_yaml(cfg: TrainConfig) -> str:
    """The options that differ from the defaults, as a `slmops train -c` file."""
    import yaml

    return str(yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False))


# olive finetune's options that slmops refuses, each with its reason (slmops.clickutil lists them at once)
train_command.refused = REFUSED  # type: ignore[attr-defined]
train_command.explain_unknown = explain_unknown  # type: ignore[attr-defined]
