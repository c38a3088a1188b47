"""Root ``slmops`` command. Subcommands are imported only when invoked, so ``slmops --help`` and
``slmops serve`` never import torch."""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any

import click

from slmops import __version__
from slmops.clickutil import OptionStyle, adopt
from slmops.errors import SlmopsUsageError

# name -> (import path "module:attr", one-line help shown by --help without importing it)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("slmops_train.cli:train_command", "Fine-tune LoRA/QLoRA adapters (olive finetune options)."),
    "finetune": ("slmops_train.cli:train_command", "olive finetune: `slmops train` with olive's options; writes <out>/adapter and <out>/model."),
    "auto-opt": ("slmops_build.olive:auto_opt_command", "olive auto-opt: `slmops build` from --model_name_or_path and --adapter_path."),
    "generate-adapter": ("slmops_build.olive:generate_adapter_command",
                         "olive generate-adapter: one multi-adapter ONNX bundle from --adapter_paths a,b."),
    "run": ("slmops_ops.olive_run:run_command", "olive run --config: train and build stages from an olive workflow config."),
    "targets": ("slmops.targets_cli:targets_command", "List the build targets and their settings."),
    "model": ("slmops.model_cli:model_group", "Prepare and inspect base models."),
    "build": ("slmops_build.cli:build_command", "Build a multi-adapter ONNX bundle for a hardware target."),
    "bundle": ("slmops_build.bundle_cli:bundle_group", "Inspect and verify bundles."),
    "serve": ("slmops_serve.cli:serve_command", "Serve a bundle over gRPC with hot-swappable adapters."),
    "generate": ("slmops_serve.cli:generate_command", "Generate text from a running server (client)."),
    "adapters": ("slmops_serve.cli:adapters_group", "List, load and unload adapters on a running server (client)."),
    "deploy": ("slmops_ops.deploy.cli:deploy_group",
               "Ship the serve image and a bundle to a Docker host, health-checked, with rollback."),
    "fleet": ("slmops_ops.fleet.cli:fleet_group",
              "Roll bundles out to devices on Docker Swarm (health-gated, staged, auto-rollback); k8s manifests."),
}


class LazyGroup(OptionStyle, click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # List commands from the table, without importing any of them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, LAZY_COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            import difflib

            close = difflib.get_close_matches(cmd_name, list(LAZY_COMMANDS), n=1)
            if close:
                ctx.fail(f"No such command '{cmd_name}'; did you mean '{close[0]}'?")
            return None
        target, _ = LAZY_COMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            extra = {"train": "train", "finetune": "train", "build": "build", "auto-opt": "build", "generate-adapter": "build",
                 "run": "build", "serve": "serve", "deploy": "deploy", "fleet": "deploy"}.get(cmd_name, "all")
            raise click.ClickException(
                f"`slmops {cmd_name}` needs the '{extra}' extra ({exc.name} is missing): "
                f"pip install 'slmops[{extra}]' or run `make install`"
            ) from exc
        command: click.Command = getattr(module, attr)
        return adopt(command)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="slmops")
def cli() -> None:
    """Fine-tune small LMs with LoRA, build multi-adapter ONNX bundles, serve them over gRPC."""


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: usage errors print one line and exit 2."""
    # No per-shard "Loading weights" / "Writing model shards" bars from transformers and the hub: our
    # own progress bars say what runs. HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        result = cli.main(args=argv, standalone_mode=False)
        # standalone_mode=False returns the command's return value: only an int is an exit code
        return result if isinstance(result, int) else 0
    except SlmopsUsageError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" or exc.ctx is None:
            exc.show()  # a bare `slmops` / `slmops bundle`: the help itself
        else:  # one line, with where to look, instead of click's usage + hint + error block
            path = _command_path(exc.ctx)
            click.echo(f"Error: {exc.format_message()} (see `{path} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, not a traceback
        if os.environ.get("SLMOPS_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # a full disk is the environment, not a bug: outputs are written to temp + rename, so
            # nothing partial was left; say where and what to do
            what = f" writing '{exc.filename}'" if exc.filename else ""
            click.echo(f"Error: no space left on the device{what} ({exc.strerror}); free space there or write "
                       "elsewhere (-o/--output_path, TMPDIR); nothing partial was kept", err=True)
            sys.exit(1)
        where = _where(exc)
        click.echo(f"Error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
                   f"{where} (an slmops bug or an environment problem; SLMOPS_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


def _command_path(ctx: click.Context) -> str:
    """``slmops bundle inspect`` whatever the program was started as (``python -m slmops.cli``)."""
    names = []
    c: click.Context | None = ctx
    while c is not None and c.parent is not None:
        names.append(c.info_name or "")
        c = c.parent
    return " ".join(["slmops", *reversed(names)])


def _where(exc: BaseException) -> str:
    """`` at module.py:123`` of the innermost frame, so a one-line report still points somewhere."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


if __name__ == "__main__":
    main()
