"""Run the onnxruntime-genai model builder on configs as transformers 5 writes them.

The builder reads the model's config with ``AutoConfig`` and then expects some fields in the shape
older transformers releases gave them. Each fix below was found by exporting a tiny random model of
the family and comparing the served tokens with transformers+PEFT (tests/e2e/test_families.py):

- Mistral: transformers has no ``layer_types`` for it, so the builder marks every layer full
  attention and exports no sliding window (served text then differs from PyTorch past the window).
  Every Mistral layer slides (``MistralAttention`` passes ``sliding_window`` on all layers).
- Gemma 3: ``rope_parameters`` is nested per layer type (``{"full_attention": {...},
  "sliding_attention": {...}}``); the builder wants the full-attention dict flat and the local base in
  ``rope_local_base_freq`` (KeyError 'rope_type' otherwise).
- Phi-3.5 / Phi-4-mini LongRoPE: the builder also reads the legacy ``type`` key (KeyError 'type').

Sliding windows are exported with ``windowed_kv_cache=false`` (see export.py): the attention op
masks the window over a full-length cache, which is the cache layout slmops' runner binds.

``python -m slmops_build.builder_compat ARGS`` is the builder's own command line with these fixes;
:func:`patched` applies them in-process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


def fix_config(config: Any) -> Any:
    """Apply the fixes above to a transformers config object (in place; returned for chaining)."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if getattr(text, "model_type", "") == "mistral" and window and getattr(text, "layer_types", None) is None:
        text.layer_types = ["sliding_attention"] * layers
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "rope_type" not in rope:
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local and getattr(text, "model_type", "").startswith("gemma3"):
            text.rope_local_base_freq = local["rope_theta"]
        full = dict(rope["full_attention"])
        text.rope_parameters = full
        if "rope_theta" in full:
            text.rope_theta = full["rope_theta"]
        rope = full
    if isinstance(rope, dict) and "rope_type" in rope and "type" not in rope:
        text.rope_parameters = {**rope, "type": rope["rope_type"]}
    return config


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Within the block, the builder's ``AutoConfig.from_pretrained`` returns fixed configs."""
    from onnxruntime_genai.models import builder

    original = builder.AutoConfig

    class FixedAutoConfig:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return fix_config(original.from_pretrained(*args, **kwargs))

    builder.AutoConfig = FixedAutoConfig
    try:
        yield
    finally:
        builder.AutoConfig = original


def main() -> None:
    """The builder's command line (the options slmops passes: -i -o -p -e -c --extra_options)."""
    from onnxruntime_genai.models import builder

    sys.argv[0] = "onnxruntime_genai.models.builder"
    args = builder.get_args()
    with patched():
        options = builder.parse_extra_options(args.model_name, args.input, args.output, args.precision,
                                              args.execution_provider, args.cache_dir, args.extra_options)
        builder.create_model(args.model_name, args.input, args.output, args.precision, args.execution_provider,
                             args.cache_dir, **options)


if __name__ == "__main__":
    main()
