"""YAML config files shared by every stage's `-c/--config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slmops.errors import SlmopsUsageError


def load_yaml(path: str | Path, what: str = "options") -> dict[str, Any]:
    """The mapping in YAML file ``path``; ``what`` names its content in the error for a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise SlmopsUsageError("--config", f"'{path}' does not exist; pass a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SlmopsUsageError("--config", f"'{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SlmopsUsageError("--config", f"'{path}' must hold a mapping of {what}")
    return data
