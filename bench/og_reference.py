"""onnxruntime-genai's own decode loop over a bundle: the INDEPENDENT ORACLE, not our decode loop.

slmops decodes with its own runner (slmops.runtime: the server, build validation, `slmops bundle
verify`, the benches). A bundle is also an onnxruntime-genai model (genai_config.json), so og's
og.Generator is a second, independently written implementation of the same computation. It is
kept for exactly two comparisons, and this module is the only og.Generator loop in the repo:

- tests/serve: every served greedy answer must equal og's on the fp32 bundle (same tokens, same text);
- bench/bench_batching.py: a lone stream's tok/s against og.Generator in-process (a peer's speed).

Do not decode with this anywhere else: use slmops.runtime.LocalModel.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OgReference:
    """og.Model over ``model_dir``; adapters named up front (``adapters``: name -> file) or by file
    path on first use. Calls are serialized (one og.Generator at a time)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, adapters: dict[str, Path] | None = None) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(model_dir))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self.eos = set(self.tokenizer.eos_token_ids)
        self._names: dict[str, str] = {}  # name or file path -> og's adapter name
        self._lock = threading.Lock()
        for name, path in (adapters or {}).items():
            self.adapters.load(str(path), name)
            self._names[name] = name

    def _adapter(self, adapter: str | Path | None) -> str | None:
        if adapter is None or adapter == "":
            return None
        key = str(adapter)
        if key not in self._names:  # a file not named up front: load it under a fresh name
            self._names[key] = f"a{len(self._names)}"
            self.adapters.load(key, self._names[key])
        return self._names[key]

    def tokens(self, ids: list[int], max_new_tokens: int, adapter: str | Path | None = None, forced: bool = False,
               on_token: Callable[[int], None] | None = None, **search: Any) -> list[int]:
        """og's new tokens after ``ids`` (an EOS it stopped on included); ``forced``: exactly
        ``max_new_tokens`` (EOS suppressed); ``on_token(n)`` after the n-th; ``search``: og search options."""
        og = self.og
        with self._lock:
            params = og.GeneratorParams(self.model)
            if forced:
                search["min_length"] = len(ids) + max_new_tokens
            params.set_search_options(max_length=len(ids) + max_new_tokens, **search)
            generator = og.Generator(self.model, params)
            name = self._adapter(adapter)
            if name is not None:
                generator.set_active_adapter(self.adapters, name)
            generator.append_tokens(ids)
            out: list[int] = []
            while not generator.is_done() and len(out) < max_new_tokens:
                generator.generate_next_token()
                out.append(int(generator.get_next_tokens()[0]))
                if on_token is not None:
                    on_token(len(out))
                if out[-1] in self.eos and not forced:
                    break
            del generator
            return out

    def generate(self, prompt: str, adapter: str | Path | None = None, max_new_tokens: int = 16,
                 **search: Any) -> tuple[str, int]:
        """(text, token count) of ``prompt`` as a client sees them: greedy unless ``search`` says otherwise."""
        tokens = self.tokens(self.tokenizer.encode(prompt), max_new_tokens, adapter, **search)
        stream = self.tokenizer.create_stream()
        text = "".join(stream.decode(t) for t in tokens if t not in self.eos)
        return text, len(tokens)

    def decode_tps(self, prompt: str, adapter: str | Path | None, tokens: int) -> float:
        """Decode tok/s of exactly ``tokens`` greedy tokens after ``prompt`` (the first token's prefill excluded)."""
        first = [0.0]

        def mark(n: int) -> None:
            if n == 1:
                first[0] = time.perf_counter()

        produced = len(self.tokens(self.tokenizer.encode(prompt), tokens, adapter, forced=True, on_token=mark,
                                   do_sample=False))
        return (produced - 1) / (time.perf_counter() - first[0])
