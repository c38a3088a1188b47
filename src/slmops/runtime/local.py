"""One prompt at a time on a bundle's model, with the server's own decode loop.

:class:`LocalModel` drives the server's :class:`~slmops.runtime.runner.ModelRunner` (one cache row)
and :mod:`slmops.runtime.text` (tokenizer, chat template, sampler): what the server computes for a
lone request, without the server. Build validation, ``slmops bundle verify`` and the benches use it,
so what they measure is the loop that serves, not a second one.

    from slmops.runtime import LocalModel, generate

    model = LocalModel(bundle / "model", manifest.lora_template)
    model.load_adapter("tone", bundle / "adapters" / "tone.onnx_adapter")
    ids = model.codec.encode(model.codec.render_chat([{"role": "user", "content": "Hi"}]))
    tokens = model.generate(ids, 32, adapter="tone")           # greedy, EOS cut off
    text = model.codec.decode(tokens)
    text = generate(bundle, "Hi", max_new_tokens=32, adapter="tone")   # the same, one call
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmops.bundle import LoraTemplate
from slmops.contract import check_adapter_file
from slmops.runtime.runner import ModelRunner
from slmops.runtime.text import Sampler, TextCodec


def empty_template() -> LoraTemplate:
    """The adapter ABI of a model served without adapters."""
    return LoraTemplate(modules=[], num_layers=0, dtype="float32", inputs=[])


class LocalModel:
    """A bundle's model in this process, one sequence at a time.

    Args:
        model_dir (Path): the bundle's model folder (model.onnx, genai_config.json, tokenizer.json).
        template (LoraTemplate | None): the bundle's adapter ABI (bundle.json ``lora_template``);
            None = no adapters can be loaded.
        threads (int | None): intra-op threads; None = genai_config.json's.
        max_length (int | None): most positions (prompt + new tokens); default the model's context.
        execution_provider (str): bundle.json ``target.execution_provider``.
    """

    def __init__(self, model_dir: str | Path, template: LoraTemplate | None = None, threads: int | None = None,
                 max_length: int | None = None, execution_provider: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.template = template or empty_template()
        self.runner = ModelRunner(self.model_dir, self.template, rows=1, threads=threads, max_length=max_length,
                                  execution_provider=execution_provider)
        self.eos_ids = set(self.runner.info.eos_ids)
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self._codec: TextCodec | None = None

    @property
    def codec(self) -> TextCodec:
        """The bundle's tokenizer and chat template (read on first use)."""
        if self._codec is None:
            self._codec = TextCodec(self.model_dir)
        return self._codec

    # ---- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> float:
        """Read and check an ``.onnx_adapter`` against the ABI; returns the milliseconds it took.

        Raises:
            ValueError: the file does not fit this model's adapter ABI (the problems, listed).
        """
        started = time.perf_counter()
        check = check_adapter_file(path, self.template)
        if check.problems:
            raise ValueError(f"{Path(path).name}: " + "; ".join(check.problems))
        self.unload_adapter(name)
        self.adapters[name] = check.tensors
        return (time.perf_counter() - started) * 1000

    def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self.runner.forget({name})

    def _lora(self, adapter: str | None) -> tuple[dict[str, np.ndarray], Any]:
        if adapter is None:
            return {}, None
        if adapter not in self.adapters:
            raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(self.adapters) or 'none'})")
        assert self.runner.bank is not None  # an adapter loaded, so the template has LoRA inputs
        return self.runner.bank.feeds([(adapter, self.adapters[adapter])]), adapter

    # ---- generation ---------------------------------------------------------------------------
    def stream(self, ids: Sequence[int], max_new_tokens: int, adapter: str | None = None,
               sampler: Sampler | None = None, stop_at_eos: bool = True,
               on_logits: Callable[[np.ndarray], None] | None = None) -> Iterator[int]:
        """The new tokens of ``ids`` one at a time, as they are computed; stops before an EOS id
        (unless not ``stop_at_eos``), after ``max_new_tokens`` or at the runner's ``max_length``.
        Greedy unless ``sampler``; ``on_logits`` sees each step's logits before the token is picked."""
        if not ids:
            raise ValueError("the prompt is empty: give at least one token id")
        pick = sampler or Sampler()
        feeds, key = self._lora(adapter)
        runner = self.runner
        length = len(ids)
        logits = runner.prefill(0, np.asarray(ids, np.int64), 0, feeds, key)
        for produced in range(max_new_tokens):
            if on_logits is not None:
                on_logits(logits)
            token = pick(logits)
            if stop_at_eos and token in self.eos_ids:
                return
            yield token
            if produced + 1 == max_new_tokens or length >= runner.max_length:
                return
            logits = runner.decode(np.asarray([token], np.int64), np.asarray([length], np.int64), feeds, key)[0]
            length += 1

    def generate(self, ids: Sequence[int], max_new_tokens: int, adapter: str | None = None,
                 sampler: Sampler | None = None, stop_at_eos: bool = True,
                 on_logits: Callable[[np.ndarray], None] | None = None) -> list[int]:
        """The new tokens of ``ids`` (EOS excluded): greedy, or sampled with ``sampler`` (see :meth:`stream`)."""
        return list(self.stream(ids, max_new_tokens, adapter, sampler, stop_at_eos, on_logits))

    def last_logits(self, ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """Logits ``[vocab]`` (float32) of the position after ``ids``."""
        feeds, key = self._lora(adapter)
        return self.runner.prefill(0, np.asarray(ids, np.int64), 0, feeds, key)

    def prompt_ids(self, prompt: str, chat: bool = True) -> list[int]:
        """``prompt``'s token ids, rendered with the chat template first when ``chat``."""
        text = self.codec.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
        return self.codec.encode(text)


def generate(bundle_dir: str | Path, prompt: str, max_new_tokens: int = 64, adapter: str | None = None,
             chat: bool = True, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, threads: int | None = None) -> str:
    """One completion of ``prompt`` on a built bundle (``adapter``: one of bundle.json's adapters)."""
    from slmops.bundle import read_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    model = LocalModel(bundle_dir / manifest.model_dir, manifest.lora_template, threads=threads,
                       execution_provider=manifest.target.execution_provider)
    if adapter is not None:
        info = manifest.adapters.get(adapter)
        if info is None:
            raise KeyError(f"the bundle has no adapter '{adapter}' (it has {sorted(manifest.adapters) or 'none'})")
        model.load_adapter(adapter, bundle_dir / info.file)
    sampler = Sampler(temperature, top_p, top_k, seed)
    return model.codec.decode(model.generate(model.prompt_ids(prompt, chat), max_new_tokens, adapter, sampler))
