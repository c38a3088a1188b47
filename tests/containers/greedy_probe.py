"""Greedy decode of a bundle, recording every step's logits: run inside a serve image (its
/opt/venv) on each architecture, so the arm64 and amd64 kernels can be compared on the same
contexts and a difference in text named with its numeric reason.

    python greedy_probe.py BUNDLE_DIR STEPS PROMPTS_JSON ADAPTERS_JSON   -> JSON on stdout

PROMPTS_JSON: a list of raw prompts (strings) or chats (lists of {"role", "content"}).
ADAPTERS_JSON: a list of adapter names ("" = base model). Output: one row per (prompt, adapter):
``tokens`` (the greedy ids) and ``logits`` (each step's full logit vector: tiny vocabularies only).
It drives the server's own model runner and text codec through slmops.runtime.LocalModel, one row
at a time, so the contexts are the ones the server decodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(bundle: str, steps: int, prompts: list, adapters: list[str]) -> list[dict]:
    from slmops.bundle import read_manifest
    from slmops.runtime import LocalModel

    manifest = read_manifest(bundle)
    model = LocalModel(Path(bundle) / manifest.model_dir, manifest.lora_template)
    codec = model.codec
    for name in adapters:
        if name:
            model.load_adapter(name, Path(bundle) / manifest.adapters[name].file)
    rows = []
    for prompt in prompts:
        # a string is a raw prompt; a list of {"role", "content"} is a chat, rendered by the bundle's template
        ids = codec.encode(prompt if isinstance(prompt, str) else codec.render_chat(prompt))
        for name in adapters:
            history: list[list[float]] = []
            tokens = model.generate(ids, steps, adapter=name or None, stop_at_eos=False,
                                    on_logits=lambda logits, history=history: history.append(
                                        [round(float(x), 6) for x in logits]))
            rows.append({"prompt": prompt, "adapter": name, "tokens": tokens, "logits": history})
    return rows


if __name__ == "__main__":
    out = main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    print(json.dumps(out))
