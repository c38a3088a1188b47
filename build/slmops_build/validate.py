"""Validate a built bundle before it is published.

- Static (always, any target): every ``.onnx_adapter`` reads, its tensors are graph LoRA inputs of
  the right dtype and shapes.
- Functional (where the target's execution provider runs here): the bundle loads in the server's
  own runtime (``slmops.runtime``: the decode loop that serves it), each adapter loads, generates,
  and changes the base model's output.
- Parity vs PyTorch (+PEFT, fp32): task accuracy (label tasks) or ROUGE-L (free text) on the
  adapter's own eval rows as its train run rendered them (``validation/<split>.jsonl`` beside its
  run.json, see ``slmops.runrecord``: files only, no train code); and base-model perplexity of the
  bundle (target precision) vs fp32 on held-out text. The build fails when the accuracy drop
  exceeds ``max_accuracy_drop`` points (and the row-flip noise), when fewer than ``min_agreement``
  of the rows get PyTorch's own answer (paired agreement: the gate sees flips that cancel out in
  the accuracy, and flips on rows both get wrong), or perplexity rises more than ``max_ppl_increase``
  percent.

The report's ``status`` is ``passed`` only when every check ran: a check that could not run (the
target's execution provider is not on this machine, the target is another CPU architecture whose
kernels did not run here, the run's eval data cannot be loaded, no run.json) makes it ``unverified``, with the reasons in ``unverified``; a check that ran and failed
makes it ``failed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops import contract
from slmops.bundle import LoraTemplate
from slmops.contract import DTYPE_OF_ONNX_TYPE as ONNX_TYPES
from slmops.contract import read_genai_config as genai_config
from slmops.platforms import host_arch
from slmops.runrecord import RunRecordError, read_validation_rows
from slmops.targets import Target
from slmops_build.adapters import PeftAdapter
from slmops_build.export import MODEL_FILE

FALLBACK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please book a table for two in Paris next Friday.",
    "I can't believe it worked on the first try!",
    "Small language models can run on edge devices.",
]
MAX_PPL_TOKENS = 256
MAX_NEW_TOKENS_CAP = 64
BASE_COMPARE_ROWS = 8


class BuildValidationError(Exception):
    """The bundle built but failed validation (accuracy drop, perplexity, broken adapter), or some
    checks could not run (``status == "unverified"``) and unverified bundles were not allowed."""

    def __init__(self, failures: list[str], report: dict[str, Any], status: str = "failed") -> None:
        self.failures = failures
        self.report = report
        self.status = status
        super().__init__(f"bundle validation {status}: " + "; ".join(failures))


@dataclass
class Bounds:
    rows: int | None = None  # eval rows per adapter; None = every eval row
    max_accuracy_drop: float = 1.0  # points (percentage points of accuracy / ROUGE-L)
    min_agreement: float = 0.97  # fraction of rows whose answer is identical to PyTorch's
    max_ppl_increase: float = 10.0  # percent
    max_new_tokens: int | None = None
    ppl_texts: int = 8  # held-out texts per adapter for the perplexity check
    torch_batch_size: int = 8
    split: str = "eval"  # the run's rows to compare on: "eval" (a build), or "test" (benchmarks' quality figures)


@dataclass
class EvalSet:
    prompts: list[str]
    references: list[str]
    label_task: bool
    chat: bool
    max_new_tokens: int
    source: str  # names no folder of this machine (bundle.json records it)
    skipped: str | None = None
    texts: list[str] = field(default_factory=list)  # prompt + answer, for perplexity
    sha256: str | None = None  # of the rows file


# ---- static checks --------------------------------------------------------------------------
def check_adapter_file(path: Path, template: LoraTemplate) -> list[str]:
    """Problems of one ``.onnx_adapter`` against the bundle's ABI (empty = fits): slmops.contract's
    check, the one the server runs before it loads an adapter."""
    return [f"{path.name}: {problem}" for problem in contract.check_adapter_file(path, template).problems]


def other_arch(target: Target) -> str | None:
    """Why a bundle for another CPU architecture stays unverified here (None on its own architecture).

    The functional and parity checks run this machine's onnxruntime kernels. A cpu-arm64 bundle
    built on x86 has the same graph and weights, but on a board its int4 MatMuls run other kernels
    (KleidiAI/SDOT int8-activation paths), so its answers there were not checked by this build.
    """
    here = host_arch()
    if target.arch == here:
        return None
    return (f"{target.arch} kernels: the checks ran this machine's {here} onnxruntime kernels; the answers on "
            f"{target.arch} were not checked (build on an {target.arch} machine to check them)")


def can_run(target: Target) -> tuple[bool, str]:
    """Whether this machine can run the target's execution provider: the server's runtime (which
    validation decodes with) finds it in this onnxruntime."""
    if target.execution_provider == "cpu":
        return True, ""
    import onnxruntime as ort

    from slmops.runtime.runner import session_providers

    try:
        session_providers(target.execution_provider, ort.get_available_providers())
    except ValueError:
        return False, f"{target.provider} is not available on this machine; only static checks ran"
    return True, ""


# ---- eval data --------------------------------------------------------------------------------
def eval_set(adapter: PeftAdapter | None, tokenizer: Any, bounds: Bounds) -> EvalSet:
    """The adapter's eval (or test) rows as its train run rendered them, or generic prompts without a run."""
    fallback = EvalSet(prompts=FALLBACK_TEXTS[:2], references=[], label_task=False, chat=False,
                       max_new_tokens=bounds.max_new_tokens or 16, source="fallback", texts=list(FALLBACK_TEXTS))
    record = adapter.record if adapter else None
    if adapter is None or adapter.run_dir is None or record is None:
        fallback.skipped = "no run.json beside the adapter: accuracy parity skipped"
        return fallback
    try:
        rows = read_validation_rows(adapter.run_dir, record, bounds.split)
    except RunRecordError as exc:
        fallback.skipped = f"{bounds.split} data of the run cannot be loaded ({exc})"
        return fallback
    if rows is None or not rows.prompts:
        fallback.skipped = f"the run has no {bounds.split} split"
        return fallback
    n = len(rows.prompts) if bounds.rows is None else min(bounds.rows, len(rows.prompts))
    refs = rows.references[:n]
    ref_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    max_new = bounds.max_new_tokens or rows.max_new_tokens or min(ref_tokens + 8, MAX_NEW_TOKENS_CAP)
    return EvalSet(prompts=rows.prompts[:n], references=refs, label_task=rows.label_task, chat=rows.chat,
                   max_new_tokens=max_new, source=rows.source, texts=rows.texts[:n], sha256=rows.sha256)


# ---- metrics ------------------------------------------------------------------------------
def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def row_scores(predictions: list[str], references: list[str], label_task: bool) -> tuple[str, list[float]]:
    """("accuracy", 0/1 per row) for label tasks, ("rouge_l", F per row) for free text."""
    if label_task:
        return "accuracy", [float(_normalize(p) == _normalize(r)) for p, r in zip(predictions, references, strict=True)]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return "rouge_l", [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def task_score(predictions: list[str], references: list[str], label_task: bool) -> tuple[str, float]:
    """("accuracy", fraction) for label tasks, ("rouge_l", mean F) for free text."""
    if not references:
        return "none", 0.0
    metric, scores = row_scores(predictions, references, label_task)
    return metric, sum(scores) / len(scores)


def paired_drop(bundle_rows: list[float], torch_rows: list[float]) -> tuple[float, float]:
    """(drop in points, its 95% noise margin in points) of paired per-row scores.

    Quantized int8 activations flip a few answers whose margins are thin, in both directions; the
    margin (1.96 standard errors of the mean paired difference, a McNemar-like test for 0/1 rows)
    separates that from a real loss.
    """
    import math

    n = len(bundle_rows)
    if n == 0:
        return 0.0, 0.0
    diffs = [t - b for b, t in zip(bundle_rows, torch_rows, strict=True)]
    mean = sum(diffs) / n
    # second moment about 0 (not the mean): a few same-direction flips still get a margin
    se = math.sqrt(sum(d * d for d in diffs) / n / n)
    return mean * 100, 1.96 * se * 100


def min_detectable_drop(rows: int) -> float:
    """Smallest drop in points that can beat the noise margin on ``rows`` 0/1 rows.

    k same-direction flips give a drop of k/n and a margin of 1.96*sqrt(k)/n: the drop wins from
    k = 4 on, so 32 rows cannot fail below 12.5 points and 50 rows below 8.
    """
    return 4 / rows * 100 if rows else float("inf")


def agreement_fails(same: int, rows: int, minimum: float) -> bool:
    """Whether ``same`` of ``rows`` answers identical to PyTorch's is below the budget.

    Below ``minimum`` with at least two rows differing: a single flipped row is never told from
    noise (as in :func:`paired_drop`, one flip never beats its margin), so 7 of 8 rows passes and
    48 of 50 (96%) fails.
    """
    return rows > 0 and same / rows < minimum and rows - same >= 2


def agreement_failure(name: str, same: int, rows: int, minimum: float) -> str:
    """The gate's line for an adapter whose answers differ from PyTorch's on too many rows."""
    return (f"adapter {name}: answers identical to PyTorch on {same}/{rows} rows ({same / rows:.1%}) < "
            f"{minimum:.0%} (--min_agreement)")


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def expected_agreement(torch_margins: list[list[float]], shifts: list[float]) -> tuple[float, float]:
    """(expected share of unseen rows whose answer stays PyTorch's, sigma): what the rows' observed
    agreement cannot see.

    A quantized bundle moves every logit a little; an answer flips where that move exceeds how sure
    PyTorch was (its answer margin: the taken token's logit minus the best other's). ``shifts`` are
    the moves of those margins measured on these rows (bundle minus PyTorch, teacher-forced on
    PyTorch's answers); sigma is their root mean square. Taken as noise independent of the margin,
    a row whose steps have margins m keeps its answer with probability prod Phi(m / sigma), and
    the mean over the rows is the agreement to expect on rows like them. 50 rows with no flip can
    still hold a few thin margins, which unseen rows will flip (the demo's tone adapter: 50/50 eval
    rows identical, 95/100 test rows).
    """
    if not shifts or not torch_margins:
        return 1.0, 0.0
    sigma = math.sqrt(sum(d * d for d in shifts) / len(shifts))
    if sigma == 0.0:
        return 1.0, 0.0
    keep = [math.prod(_phi(m / sigma) for m in margins) for margins in torch_margins]
    return sum(keep) / len(keep), sigma


def expected_agreement_failure(name: str, expected: float, sigma: float, margins: list[list[float]], minimum: float) -> str:
    thin = sum(1 for m in margins if m and min(m) < 2 * sigma)
    return (f"adapter {name}: expected agreement on unseen rows {expected:.1%} < {minimum:.0%} (--min_agreement): the "
            f"bundle moves PyTorch's answer margins by {sigma:.2f} logits (rms) and {thin}/{len(margins)} rows have a "
            f"margin under twice that")


# ---- runners --------------------------------------------------------------------------------
def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i]
    return tokens


def answer_margins(logits: Any, path: list[int]) -> list[float]:
    """Per step: the logit of ``path``'s token minus the best other token's (``logits`` [steps, vocab])."""
    import numpy as np

    lg = np.array(logits[:len(path)], dtype=np.float32, copy=True)
    steps = np.arange(len(path))
    taken = lg[steps, path].copy()
    lg[steps, path] = -np.inf
    return [float(x) for x in taken - lg.max(axis=-1)]


@dataclass
class TorchAnswers:
    """PyTorch fp32(+PEFT) greedy answers on a set of prompts, and how sure it was of each token."""

    tokens: list[list[int]]  # the answers, EOS cut off
    paths: list[list[int]]  # the tokens generated: the answer, then the EOS that ended it (if one did)
    margins: list[list[float]]  # per step of the path: the logit taken minus the best other's

    @property
    def stopped(self) -> list[bool]:
        """Whether each answer ended with an EOS (not the token cap)."""
        return [len(p) > len(t) for p, t in zip(self.paths, self.tokens, strict=True)]


def torch_greedy(model: Any, prompts: list[list[int]], max_new: int, eos: set[int], pad: int,
                 batch_size: int) -> TorchAnswers:
    """Greedy answers of a transformers model, left-padded batches (as the train stage evaluates), with
    each step's raw logits kept for the answer margins."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos) or None, pad_token_id=pad)
    answers = TorchAnswers([], [], [])
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                 output_logits=True, return_dict_in_generate=True)
            steps = torch.stack(out.logits, dim=1).float().numpy()  # [rows, steps, vocab]
            for row, sequence in enumerate(out.sequences):
                new = [int(t) for t in sequence[width:]]
                cut = _cut(new, eos)
                path = new[:len(cut) + 1] if len(cut) < len(new) else cut
                answers.tokens.append(cut)
                answers.paths.append(path)
                answers.margins.append(answer_margins(steps[row], path))
    return answers


class OrtScorer:
    """Full-sequence logits of the bundle's graph with onnxruntime (rank-0 LoRA defaults = base)."""

    def __init__(self, model_dir: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        decoder = genai_config(model_dir)["model"]["decoder"]
        self.head_size = int(decoder["head_size"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]

    def logits(self, ids: list[int], adapter: dict[str, Any] | None = None) -> Any:
        """Logits [len(ids), vocab]; ``adapter`` ({input name: array}) is fed as the LoRA inputs."""
        import numpy as np

        arr = np.array([ids], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": arr, "attention_mask": np.ones_like(arr), **(adapter or {})}
        for item in self.past:
            dtype = ONNX_TYPES.get(item.type, "float32")
            feeds[item.name] = np.zeros((1, item.shape[1], 0, self.head_size), dtype=dtype)
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32)


def _nll(logits: Any, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given logits [len, vocab] (float64 math)."""
    import numpy as np

    lg = np.asarray(logits[:-1], dtype=np.float64)
    target = np.asarray(ids[1:])
    lg = lg - lg.max(axis=-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].sum()), len(target)


def _ppl(pairs: list[tuple[float, int]]) -> float:
    total = sum(p[0] for p in pairs)
    count = sum(p[1] for p in pairs)
    return math.exp(total / count) if count else float("nan")


# ---- the whole validation ------------------------------------------------------------------
def validate_bundle(bundle_dir: Path, hf_model_dir: str | Path, template: LoraTemplate, target: Target,
                    adapters: dict[str, tuple[PeftAdapter, Path]], bounds: Bounds,
                    merged: PeftAdapter | None = None,
                    torch_answers: dict[str, TorchAnswers] | None = None) -> dict[str, Any]:
    """Run every check; return the report (``passed``, ``failures`` and all figures).

    ``adapters``: name -> (checked PEFT adapter, its ``.onnx_adapter`` in the bundle).
    ``merged``: the adapter merged into the weights of a merged bundle (compared to base+PEFT).
    ``torch_answers``: PyTorch's greedy answers on these rows, already computed (by the search).
    """
    started = time.time()
    model_dir = bundle_dir / "model"
    report: dict[str, Any] = {"rows": bounds.rows if bounds.rows is not None else "all",
                              "max_accuracy_drop_points": bounds.max_accuracy_drop, "min_agreement": bounds.min_agreement,
                              "max_ppl_increase_pct": bounds.max_ppl_increase, "adapters": {}}
    failures: list[str] = []
    unverified: list[str] = []
    for name, (_, path) in adapters.items():
        problems = check_adapter_file(path, template)
        report["adapters"][name] = {"static_ok": not problems}
        failures += [f"adapter {name}: {p}" for p in problems]
    runnable, why = can_run(target)
    if failures or not runnable:
        report.update(functional="skipped", reason=why or "static checks failed")
        if why:
            unverified.append(why)
        return _finish(report, failures, started, unverified)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_model_dir))
    from slmops.runtime import LocalModel

    # the server's decode loop, on the target's provider (greedy; EOS cut off)
    runner = LocalModel(model_dir, template, execution_provider=target.execution_provider)
    base = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32)
    base.eval()
    peft_model = _load_peft(base, {n: a for n, (a, _) in adapters.items()} if not merged else {merged.name: merged})
    eos = runner.eos_ids

    def encode(text: str, chat: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos or {0})
    # teacher-forced logits of the bundle's graph: its answer margins on PyTorch's own answers
    scorer = OrtScorer(model_dir, threads=int(target.session_options.get("intra_op_num_threads", 2)))

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    texts: list[tuple[str, bool]] = []
    checks: list[tuple[str, PeftAdapter, Path | None]] = [(n, a, p) for n, (a, p) in adapters.items()]
    if merged is not None:
        checks = [(merged.name, merged, None)]
    for name, adapter, onnx_path in checks:
        entry = report["adapters"].setdefault(name, {})
        data = eval_set(adapter, tokenizer, bounds)
        texts += [(t, data.chat) for t in data.texts[:bounds.ppl_texts]]
        active = None
        if onnx_path is not None:
            try:
                entry["load_ms"] = round(runner.load_adapter(name, onnx_path), 3)
                active = name
            except Exception as exc:  # noqa: BLE001 - an ABI mismatch (ValueError) or any onnxruntime error
                failures.append(f"adapter {name}: the runtime cannot load it ({exc})")
                continue
        if peft_model is not None:
            peft_model.set_adapter(name)
        prompt_ids = [encode(p, data.chat) for p in data.prompts]
        t0 = time.time()
        bundle_tokens = [runner.generate(ids, data.max_new_tokens, active) for ids in prompt_ids]
        entry["bundle_generate_s"] = round(time.time() - t0, 3)
        known = (torch_answers or {}).get(name)
        if known is None or len(known.tokens) != len(prompt_ids):
            known = torch_greedy(peft_model if peft_model is not None else base, prompt_ids, data.max_new_tokens, eos, pad,
                                 bounds.torch_batch_size)
        torch_tokens = known.tokens
        entry["rows"] = len(prompt_ids)
        entry["eval_source"] = data.source
        if data.sha256:
            entry["eval_sha256"] = data.sha256
        same = sum(a == b for a, b in zip(bundle_tokens, torch_tokens, strict=True))
        entry["token_agreement"] = entry["agreement"] = same / max(len(prompt_ids), 1)
        entry["rows_same"] = same
        feeds = contract.check_adapter_file(onnx_path, template).tensors if onnx_path is not None else None
        shifts = [b - t for ids, path, margins in zip(prompt_ids, known.paths, known.margins, strict=True)
                  for b, t in zip(answer_margins(scorer.logits(ids + path, feeds)[len(ids) - 1:], path), margins, strict=True)]
        expected, sigma = expected_agreement(known.margins, shifts)
        entry.update(expected_agreement=round(expected, 4), margin_shift_rms=round(sigma, 4))
        if agreement_fails(same, len(prompt_ids), bounds.min_agreement):
            failures.append(agreement_failure(name, same, len(prompt_ids), bounds.min_agreement))
        elif expected < bounds.min_agreement:
            failures.append(expected_agreement_failure(name, expected, sigma, known.margins, bounds.min_agreement))
        if active is not None:
            base_tokens = [runner.generate(ids, data.max_new_tokens, None) for ids in prompt_ids[:BASE_COMPARE_ROWS]]
            diff = float(abs(runner.last_logits(prompt_ids[0], active) - runner.last_logits(prompt_ids[0], None)).max())
            entry["logit_max_abs_diff_vs_base"] = diff
            entry["answers_differing_from_base"] = f"{sum(a != b for a, b in zip(bundle_tokens, base_tokens, strict=False))}/{len(base_tokens)}"
            if not diff > 0:
                failures.append(f"adapter {name}: leaves the base model's logits unchanged (LoRA inputs not fed?)")
        entry["sample"] = {"prompt": data.prompts[0][-160:], "bundle": decode(bundle_tokens[0]), "pytorch": decode(torch_tokens[0])}
        if data.skipped:
            entry["parity"] = f"skipped: {data.skipped}"
            unverified.append(f"adapter {name}: accuracy parity not checked: {data.skipped}")
            continue
        metric, bundle_rows = row_scores([decode(t) for t in bundle_tokens], data.references, data.label_task)
        _, torch_rows = row_scores([decode(t) for t in torch_tokens], data.references, data.label_task)
        bundle_score, torch_score = sum(bundle_rows) / len(bundle_rows), sum(torch_rows) / len(torch_rows)
        drop, margin = paired_drop(bundle_rows, torch_rows)
        entry.update(metric=metric, bundle=round(bundle_score, 4), pytorch=round(torch_score, 4), drop_points=round(drop, 2),
                     noise_margin_points=round(margin, 2),
                     rows_differing=sum(b != t for b, t in zip(bundle_rows, torch_rows, strict=True)))
        if metric == "accuracy":  # what these rows can resolve at all, beside the bound
            entry["min_detectable_drop_points"] = round(max(bounds.max_accuracy_drop, min_detectable_drop(len(bundle_rows))), 2)
        # A drop fails when it is both above the bound and above row-flip noise.
        if drop > bounds.max_accuracy_drop and drop > margin:
            failures.append(f"adapter {name}: {metric} {bundle_score:.3f} on the bundle vs {torch_score:.3f} in PyTorch "
                            f"(drop {drop:.1f} points > {bounds.max_accuracy_drop}, beyond the {margin:.1f}-point noise "
                            f"of {entry['rows_differing']} differing rows)")

    # Perplexity: the bundle's base model (rank-0 LoRA defaults, or the merged weights) vs fp32.
    if not texts:
        texts = [(t, False) for t in FALLBACK_TEXTS]
    seen: set[str] = set()
    onnx_nll, torch_nll = [], []
    for text, chat in texts:
        if text in seen:
            continue
        seen.add(text)
        ids = encode(text, chat)[:MAX_PPL_TOKENS]
        if len(ids) < 2:
            continue
        onnx_nll.append(_nll(scorer.logits(ids), ids))
        with torch.no_grad():
            if peft_model is not None and merged is None:
                with peft_model.disable_adapter():
                    logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
            else:
                logits = (peft_model or base)(input_ids=torch.tensor([ids])).logits[0]
        torch_nll.append(_nll(logits.float().numpy(), ids))
    ppl_bundle, ppl_fp32 = _ppl(onnx_nll), _ppl(torch_nll)
    increase = (ppl_bundle / ppl_fp32 - 1) * 100
    report["perplexity"] = {"texts": len(onnx_nll), "tokens": sum(n for _, n in onnx_nll), "fp32": round(ppl_fp32, 4),
                            target.precision: round(ppl_bundle, 4), "increase_pct": round(increase, 3)}
    if not increase <= bounds.max_ppl_increase:
        failures.append(f"perplexity {ppl_bundle:.3f} ({target.precision}) vs {ppl_fp32:.3f} (fp32): +{increase:.1f}% > {bounds.max_ppl_increase}%")
    report["functional"] = "ran"
    report["kernels"] = host_arch()
    other = other_arch(target)
    if other:
        unverified.append(other)
    return _finish(report, failures, started, unverified)


def quiet_transformers() -> None:
    """No weight-loading bars or deprecation chatter from transformers during a build."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _load_peft(base: Any, adapters: dict[str, PeftAdapter]) -> Any:
    if not adapters:
        return None
    from peft import PeftModel

    model = None
    for name, adapter in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, str(adapter.adapter_dir), adapter_name=name)
        else:
            model.load_adapter(str(adapter.adapter_dir), adapter_name=name)
    assert model is not None
    model.eval()
    return model


def _finish(report: dict[str, Any], failures: list[str], started: float, unverified: list[str] | None = None) -> dict[str, Any]:
    report["failures"] = failures
    report["unverified"] = unverified or []
    report["status"] = "failed" if failures else "unverified" if unverified else "passed"
    report["passed"] = report["status"] == "passed"
    report["seconds"] = round(time.time() - started, 2)
    return report
