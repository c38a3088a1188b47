"""Text in and out of the engine: the bundle's tokenizer.json (HF ``tokenizers``), its chat
template (jinja2, with the environment transformers renders chat templates with), incremental
detokenization, and token sampling.

The server does not load onnxruntime-genai's og.Model just for its tokenizer: that would hold
a second copy of the weights. ``tokenizers`` reads the same tokenizer.json the model builder wrote
(onnxruntime-genai's tokenizer reproduces it exactly; a test checks ids and text against it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TemplateError(ValueError):
    """The chat template is missing or failed to render."""


class TextCodec:
    """Tokenizer, chat template and special tokens of a bundle's model folder."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template_file = model_dir / CHAT_TEMPLATE_FILE
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._compiled: Any = None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=False)
        return text

    def stream(self) -> TokenStream:
        return TokenStream(self.tokenizer)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt of ``messages`` with the generation prompt appended (as transformers renders it)."""
        if self.chat_template is None:
            raise TemplateError("the bundle's model has no chat template")
        if self._compiled is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as exc:
                raise TemplateError(f"the chat template does not parse: {exc}") from exc
        try:
            rendered: str = self._compiled.render(messages=messages, add_generation_prompt=True,
                                                  **{k: v for k, v in self.special.items() if v is not None})
        except Exception as exc:  # noqa: BLE001 - jinja raises many types for a template that does not fit
            raise TemplateError(str(exc)) from exc
        return rendered


class TokenStream:
    """Incremental detokenization: text of each new token, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def decode(self, token: int) -> str:
        piece = self._stream.step(self._tokenizer, int(token))
        return piece or ""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Sampler:
    """Picks a row's next token: greedy at temperature 0, else temperature / top-k / top-p sampling
    with the row's own seeded generator (so a seed reproduces its text whatever the batch)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy or not np.isfinite(logits).any():
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            keep = np.argpartition(scores, -self.top_k)[-self.top_k:]
        else:
            keep = np.arange(scores.shape[-1])
        keep = keep[np.isfinite(scores[keep])]  # tokens masked out (min tokens, grammar) stay out
        kept = scores[keep]
        order = np.argsort(-kept, kind="stable")
        keep, kept = keep[order], kept[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            cutoff = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            keep, probs = keep[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return int(keep[self.rng.choice(len(keep), p=probs)])
