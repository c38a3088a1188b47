"""Errors that reach a user: each names the option at fault and how to fix it."""

from __future__ import annotations

from typing import Any


class SlmopsUsageError(Exception):
    """Bad user input. The CLI prints it on one line and exits with code 2.

    Args:
        option (str): the CLI option / config field at fault, e.g. ``--data_files``.
        message (str): what is wrong and how to fix it.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


def usage_error_from_validation(exc: Any, command: str, source: str = "", aliases: dict[str, str] | None = None,
                                last_part: bool = False, no_field: str = "config",
                                hints: dict[tuple[str, str], str] | None = None) -> SlmopsUsageError:
    """A pydantic ``ValidationError`` of a stage config as the SlmopsUsageError the CLI prints.

    The first error names the option (``--<field>``, through ``aliases``; ``last_part`` takes the
    innermost field of a nested location); a validator message that starts with ``--opt: `` names
    its own option; an unknown field points at ``slmops COMMAND --help``. ``hints`` adds text for
    ``(error type, option)`` pairs. ``source`` (a YAML path) is appended to the message.
    """
    err = exc.errors()[0]
    where = f" (in {source})" if source else ""
    parts = [str(p) for p in err["loc"] if not isinstance(p, int)]
    option = "--" + (parts[-1] if last_part else parts[0]) if parts else no_field
    option = (aliases or {}).get(option, option)
    if err["type"] == "extra_forbidden":
        return SlmopsUsageError(option, f"unknown option{where}; see `slmops {command} --help`")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if msg.startswith("--"):
        option, _, msg = msg.partition(": ")
    hint = (hints or {}).get((err["type"], option))
    if hint:
        msg = f"{msg}; {hint}"
    return SlmopsUsageError(option, f"{msg}{where}")
