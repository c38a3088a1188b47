"""Errors that reach a user: each names the option at fault and how to fix it."""

from __future__ import annotations


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
