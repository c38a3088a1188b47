"""Greedy decode of a bundle, recording every step's logits: run inside a serve image (its
/opt/venv) on each architecture, so the arm64 and amd64 kernels can be compared on the same
contexts and a difference in text named with its numeric reason.

    python greedy_probe.py BUNDLE_DIR STEPS PROMPTS_JSON ADAPTERS_JSON   -> JSON on stdout

PROMPTS_JSON: a list of raw prompts (strings) or chats (lists of {"role", "content"}).
ADAPTERS_JSON: a list of adapter names ("" = base model). Output: one row per (prompt, adapter):
``tokens`` (the greedy ids) and ``logits`` (each step's full logit vector: tiny vocabularies only).
It drives the server's own model runner and text codec (slmops_serve.runner / .text), one row at
a time, so the contexts are the ones the server decodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(bundle: str, steps: int, prompts: list, adapters: list[str]) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    from slmops_serve.runner import ModelRunner
    from slmops_serve.text import TextCodec

    from slmops.bundle import read_manifest

    manifest = read_manifest(bundle)
    model_dir = Path(bundle) / manifest.model_dir
    runner = ModelRunner(model_dir, manifest.lora_template, rows=1)
    codec = TextCodec(model_dir)
    tensors = {}
    for name in adapters:
        if name:
            params = ort.AdapterFormat.read_adapter(str(Path(bundle) / manifest.adapters[name].file)).get_parameters()
            tensors[name] = {k: v.numpy().copy() for k, v in params.items()}
    rows = []
    for prompt in prompts:
        # a string is a raw prompt; a list of {"role", "content"} is a chat, rendered by the bundle's template
        ids = codec.encode(prompt if isinstance(prompt, str) else codec.render_chat(prompt))
        for name in adapters:
            lora = runner.bank.feeds([(name, tensors[name])]) if name and runner.bank is not None else {}
            key = name or None
            logits = runner.prefill(0, np.asarray(ids, np.int64), 0, lora, key)
            tokens: list[int] = []
            history: list[list[float]] = []
            while len(tokens) < steps:
                history.append([round(float(x), 6) for x in logits])
                token = int(np.argmax(logits))
                tokens.append(token)
                logits = runner.decode(np.asarray([token], np.int64), np.asarray([len(ids) + len(tokens) - 1]),
                                       lora, key)[0]
            rows.append({"prompt": prompt, "adapter": name, "tokens": tokens, "logits": history})
    return rows


if __name__ == "__main__":
    out = main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    print(json.dumps(out))
