"""The decode loop the server runs, for every stage: one onnxruntime session over a bundle's graph
(:mod:`.runner`: KV cache, batched LoRA feeds), the bundle's tokenizer and chat template and the
sampler (:mod:`.text`), and one-prompt generation on top of them (:mod:`.local`).

Needs numpy, onnxruntime, tokenizers and jinja2 (the ``serve`` and ``build`` extras). ``import
slmops`` does not import this package; the names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmops.runtime.local import LocalModel, generate
    from slmops.runtime.runner import ModelRunner
    from slmops.runtime.text import Sampler, TextCodec

_WHERE = {"LocalModel": "local", "generate": "local", "ModelRunner": "runner", "Sampler": "text", "TextCodec": "text"}
__all__ = ["LocalModel", "ModelRunner", "Sampler", "TextCodec", "generate"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'slmops.runtime' has no attribute '{name}'")
    return getattr(importlib.import_module(f"slmops.runtime.{module}"), name)
