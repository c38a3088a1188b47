"""slmops' one option style (slmops.clickutil), in process on small click commands and the real ones."""

from __future__ import annotations

from typing import Any

import click
import pytest

from slmops.clickutil import adopt
from slmops.errors import SlmopsUsageError


def _command() -> click.Command:
    @click.command("demo")
    @click.option("--max_steps", type=int, default=None)
    @click.option("--gradient_checkpointing/--no-gradient_checkpointing", default=None)
    @click.option("--use_ort_genai", is_flag=True, default=None)
    @click.option("--metrics-port", type=int, default=None)
    @click.option("--tag", multiple=True)
    @click.argument("path", required=False)
    def demo(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    command = adopt(demo)
    command.refused = {"--enable_search": "no pass search here"}  # type: ignore[attr-defined]
    return command


def run(*args: str) -> dict[str, Any]:
    result: dict[str, Any] = _command().main(list(args), standalone_mode=False)
    return result


@pytest.mark.parametrize("args, key, value", [
    (["--max_steps", "3"], "max_steps", 3),
    (["--max-steps", "3"], "max_steps", 3),
    (["--max-steps=3"], "max_steps", 3),
    (["--metrics_port", "9"], "metrics_port", 9),
    (["--gradient_checkpointing"], "gradient_checkpointing", True),
    (["--gradient_checkpointing", "true"], "gradient_checkpointing", True),
    (["--gradient-checkpointing", "False"], "gradient_checkpointing", False),
    (["--gradient_checkpointing=no"], "gradient_checkpointing", False),
    (["--no-gradient_checkpointing"], "gradient_checkpointing", False),
    (["--use_ort_genai", "true"], "use_ort_genai", True),
    (["--use_ort_genai", "false"], "use_ort_genai", None),  # a plain flag set false: as if not given
    (["--tag", "--max_steps"], "tag", ("--max_steps",)),  # an option's value is not parsed as an option
])
def test_spellings_and_boolean_forms(args: list[str], key: str, value: Any) -> None:
    assert run(*args)[key] == value


def test_a_boolean_value_does_not_eat_the_argument() -> None:
    out = run("--gradient_checkpointing", "some/path")
    assert out["gradient_checkpointing"] is True and out["path"] == "some/path"
    # with an argument in the command, only true/false are flag values: "yes" stays the argument
    out = run("--gradient_checkpointing", "yes")
    assert out["gradient_checkpointing"] is True and out["path"] == "yes"
    assert run("--gradient_checkpointing", "false")["gradient_checkpointing"] is False


def test_unknown_and_refused_options_are_reported_together() -> None:
    with pytest.raises(SlmopsUsageError) as info:
        run("--bogus", "1", "--max_stps", "2", "--enable-search", "--also")
    text = str(info.value)
    assert text.startswith("--bogus, --max_stps, --also:")
    assert "--max_steps for --max_stps" in text and "--enable-search: no pass search here" in text


def test_a_bad_boolean_names_the_option() -> None:
    with pytest.raises(SlmopsUsageError, match="--gradient_checkpointing: 'maybe' is not a boolean"):
        run("--gradient_checkpointing=maybe")


def test_help_shows_underscores_and_version_is_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    command = _command()
    with pytest.raises(SystemExit):
        command.main(["--help"])
    out = capsys.readouterr().out
    assert "--metrics_port" in out and "--metrics-port" not in out and "--version" in out
    with pytest.raises(SystemExit) as info:
        command.main(["--version"])
    assert info.value.code == 0 and "slmops" in capsys.readouterr().out


def test_every_real_subcommand_is_adopted_and_parses_olive_spellings() -> None:
    from slmops.cli import LAZY_COMMANDS, cli

    ctx = click.Context(cli)
    for name in LAZY_COMMANDS:
        try:
            command = cli.get_command(ctx, name)
        except click.ClickException:  # an extra that is not installed here
            continue
        assert command is not None and hasattr(command, "refused"), name
        long_opts = [o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]
        assert not [o for o in long_opts if "-" in o[2:] and not o.startswith("--no-")], (name, long_opts)
