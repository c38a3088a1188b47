"""Speculative decoding without a draft model: prompt lookup (n-gram) drafts and grammar-forced tokens.

Each decode step, a row may propose draft tokens: the tokens the llguidance grammar forces next
(jump-forward for structured output), then, from the row's own prompt + output, the tokens that
followed the most recent earlier occurrence of its last n-gram (prompt lookup, as vLLM's n-gram
speculation). The row's next token and its drafts go through the graph in one call
(:meth:`slmops.runtime.runner.ModelRunner.verify`, with the row's own adapter) and the drafts are
accepted while the token the row selects from its logits equals the draft, plus the token selected
after the last accepted one (the bonus). Rejected positions are rolled back by the row's length
(the next step overwrites them).

One call per drafting row: onnxruntime's CPU GroupQueryAttention refuses several tokens over a
cached past for more than one row per call ("batch_size must be 1 when sequence_length > 1 and
past context is given"). So a lone row verifies its draft in its decode call; in a batch, every
row decodes one token in the shared call, and then a row whose draft is expected to yield at least
as many tokens as a batch step (forced tokens fully, guesses at its recent acceptance rate)
verifies it in a call of its own.

Exactness: every emitted token is selected exactly as without speculation (same logits position,
same grammar mask, same sampler call), so greedy output is the same token for token, and a
sampling row (temperature > 0) draws from the same distribution with the same random numbers: for
a deterministic draft, "sample from the target's distribution, accept the draft if they agree" IS
the standard speculative acceptance rule (accept with probability p(draft), else sample from p
without the draft). Only the floating-point noise of a multi-token call differs from a one-token
call (as a batch of several rows already does).

Per-row adaptivity (:class:`RowDrafter`): a row's draft length follows what it accepted, and a row
whose drafts keep failing stops drafting for a growing number of steps, so free chat and label
tasks pay (almost) nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPECULATION_MODES = ("off", "ngram")


@dataclass
class SpecSettings:
    """``mode`` "ngram" (prompt lookup + grammar-forced tokens) or "off"; ``max_draft`` tokens per row and
    step; n-grams of ``ngram_max`` down to ``ngram_min`` tokens are looked up."""

    mode: str = "ngram"
    max_draft: int = 8
    ngram_max: int = 4
    ngram_min: int = 2

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.max_draft > 0


def ngram_draft(history: np.ndarray, length: int, k: int, ngram_max: int = 4, ngram_min: int = 2,
                source: np.ndarray | None = None) -> np.ndarray:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the last n tokens of
    ``history[:length]`` (longest n first, ``ngram_max`` down to ``ngram_min``); empty when none.
    ``source``: look the n-gram up there instead (e.g. an earlier output of the same adapter)."""
    if k <= 0:
        return history[:0]
    h = history[:length]
    own = source is None
    src = h if source is None else source
    for n in range(min(ngram_max, length - 1 if own else length), ngram_min - 1, -1):
        # candidate starts i in [0, starts): a token follows the match (and, in the own history, it ends before the tail)
        starts = length - n if own else len(src) - n
        if starts <= 0:
            continue
        tail = h[length - n:]
        hit = src[:starts] == tail[0]
        for j in range(1, n):
            if not hit.any():
                break
            hit &= src[j:starts + j] == tail[j]
        found = np.flatnonzero(hit)
        if found.size:
            i = int(found[-1]) + n
            return src[i:min(i + k, len(src) if not own else length)]
    return h[:0]


class CallCosts:
    """Measured seconds of graph calls by (rows, tokens per row), as moving averages, so the engine
    drafts only what pays on this machine under its current load: a draft of k tokens is verified
    when the expected tokens it yields per second beat a plain step's. Widths never measured get
    an optimistic prior (1 + ``prior_slope`` per extra token), so they are tried once and then
    judged by their measured cost."""

    def __init__(self, prior_slope: float = 0.15) -> None:
        self.prior_slope = prior_slope
        self._seconds: dict[tuple[int, int], float] = {}
        self._prefill: float | None = None  # seconds per prompt token of a chunked prefill call
        self._since_base = 0  # calls since the last plain one-row call (the unit every ratio needs)

    def observe(self, rows: int, width: int, seconds: float) -> None:
        key = (rows, width)
        self._since_base = 0 if key == (1, 1) else self._since_base + 1
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else 0.9 * old + 0.1 * seconds

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill call of one row's ``tokens`` prompt tokens (over a cached past) took ``seconds``."""
        per_token = seconds / max(1, tokens)
        self._prefill = per_token if self._prefill is None else 0.8 * self._prefill + 0.2 * per_token

    def prefill_budget(self, rows: int, steps: float) -> int | None:
        """Prompt tokens that one prefill call can take in about ``steps`` decode steps of ``rows``
        rows; None until both were measured."""
        step = self._seconds.get((rows, 1))
        if not step or not self._prefill:
            return None
        return int(steps * step / self._prefill)

    def ratio(self, width: int, rows: int = 1) -> float:
        """A call of ``rows`` rows x ``width`` tokens against one row x one token."""
        base, cost = self._seconds.get((1, 1)), self._seconds.get((rows, width))
        if base and cost:
            return cost / base
        return 1.0 + self.prior_slope * (width - 1) + 0.1 * (rows - 1)

    def best_length(self, forced: int, guesses: int, rate: float, batch: int = 1) -> int:
        """How many of a draft's tokens (``forced`` first, then ``guesses`` accepted with probability
        ``rate`` each, in a chain) to verify in a lone-row call: the most expected tokens per unit of
        cost, against a plain step of ``batch`` rows (``batch`` tokens); 0 when no draft pays."""
        if batch == 1 and ((1, 1) not in self._seconds or self._since_base >= 64):
            return 0  # measure a plain step first (and now and then again: the load moves)
        best, best_value = 0, batch / self.ratio(1, batch)
        expected, chain = 1.0, 1.0
        for k in range(1, forced + guesses + 1):
            chain *= 0.98 if k <= forced else rate
            expected += chain
            value = expected / self.ratio(1 + k)
            if value > best_value:
                best, best_value = k, value
        return best


class RowDrafter:
    """One row's drafting state: its draft length and back-off.

    The next draft length is the last accepted count + 2 (at most ``max_draft``), so a row copying
    a long span drafts long and a row whose guesses fail drafts short. After ``patience`` drafting
    steps in a row with nothing accepted, the row stops drafting for 4, 8, 16 ... (at most 64) steps,
    then tries again; an accepted draft resets the back-off."""

    def __init__(self, settings: SpecSettings, patience: int = 3, rate: float = 0.5) -> None:
        self.settings = settings
        self.limit = settings.max_draft
        self.patience = patience
        self.failures = 0  # drafting steps in a row that accepted nothing
        self.pause = 0  # steps left without drafting
        self.backoff = 4
        self.drafted = 0
        self.accepted = 0
        self.rate = rate  # recent share of drafted tokens accepted (moving average)

    def propose(self, history: np.ndarray, length: int, room: int, corpus: Sequence[np.ndarray] = ()) -> np.ndarray:
        """This step's n-gram draft (at most ``room`` tokens), or none while paused: from the row's own
        prompt + output, else from ``corpus`` (recent outputs of the same adapter, newest first)."""
        if self.pause > 0:
            self.pause -= 1
            return history[:0]
        s = self.settings
        k = min(self.limit, room)
        draft = ngram_draft(history, length, k, s.ngram_max, s.ngram_min)
        for source in corpus:
            if len(draft):
                break
            draft = ngram_draft(history, length, k, s.ngram_max, s.ngram_min, source=source)
        return draft

    def skipped(self) -> None:
        """A step where the draft did not pay and was not verified: the rate drifts back toward the
        prior, so a row is tried again later."""
        self.rate += 0.02 * (0.5 - self.rate)

    def update(self, drafted: int, accepted: int) -> None:
        """After a step that verified ``drafted`` n-gram tokens of this row, ``accepted`` of them taken."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.rate = 0.7 * self.rate + 0.3 * accepted / drafted
        self.limit = max(1, min(self.settings.max_draft, accepted + 2))
        if accepted > 0:
            self.failures = 0
            self.backoff = 4
            return
        self.failures += 1
        if self.failures >= self.patience:
            self.pause = self.backoff
            self.backoff = min(64, 2 * self.backoff)
            self.failures = 0
