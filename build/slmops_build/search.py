"""``slmops build --search`` / ``slmops auto-opt``: the quantization chosen by measuring.

From ONE fp32 export, each candidate recipe is quantized (one quantization per int4 block size;
the accuracy-level variants of a block size only rewrite MatMulNBits attributes) and measured on
this machine against PyTorch fp32+PEFT on the adapters' eval rows:

1. Quality screen, every candidate: each eval row is run once through the candidate's graph with
   PyTorch's greedy answer appended (teacher forcing). A row *agrees* when the graph's argmax is
   PyTorch's token at every answer position and an end-of-sequence after it: then greedy decoding
   gives exactly PyTorch's answer. Rows that differ are decoded greedily by the server's runtime
   to score them, giving the metric drop and its paired noise margin (``validate.paired_drop``).
   Base perplexity of the graph (no adapter) vs fp32 on the rows' texts.
2. Speed, only for candidates within the budget: decode tokens/s of one stream (no adapter and
   each adapter) and of 4 streams with mixed adapters in one batch, every case warmed up and the
   candidates interleaved round by round (medians).
3. The pick: the fastest candidate (one-stream decode tok/s, the mean over no adapter and each
   adapter) whose every adapter is within the budget (``min_agreement`` and ``max_accuracy_drop``
   beyond the noise) and whose perplexity is within ``max_ppl_increase``.

The table, the Pareto front (speed vs the lowest adapter agreement) and the reason for the pick
go into bundle.json (``build.search``); the picked bundle is then validated like any other build
(the server's decode loop vs PyTorch on every eval row).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.bundle import LoraTemplate
from slmops.targets import Target
from slmops_build.export import MODEL_FILE
from slmops_build.validate import TorchAnswers

SPEED_TOKENS = 32
SPEED_ROUNDS = 3
MIXED_STREAMS = 4


@dataclass(frozen=True)
class Candidate:
    """One quantization recipe: slmops quantizer options over the target's."""

    name: str
    options: dict[str, str]
    note: str

    @property
    def block(self) -> int:
        return int(self.options.get("block_size", 32))


def candidates(target: Target) -> list[Candidate]:
    """The recipes the search measures for ``target`` (int4 on cpu: the slmops quantizer's knobs)."""
    return [
        Candidate("int4-b32-acc4", {"block_size": "32", "accuracy_level": "4"}, "the default: int8 activations everywhere"),
        Candidate("int4-b32-acc4-last4fp32", {"block_size": "32", "accuracy_level": "4", "fp32_last_layers": "4"},
                  "fp32 activations in the last 4 layers"),
        Candidate("int4-b32-acc4-last10fp32", {"block_size": "32", "accuracy_level": "4", "fp32_last_layers": "10"},
                  "fp32 activations in the last 10 layers"),
        Candidate("int4-b32-acc1", {"block_size": "32", "accuracy_level": "1"}, "fp32 activations in every int4 MatMul"),
        Candidate("int4-b64-acc4", {"block_size": "64", "accuracy_level": "4"}, "64-weight blocks"),
        Candidate("int4-b128-acc4", {"block_size": "128", "accuracy_level": "4"}, "128-weight blocks"),
    ]


def searchable(target: Target) -> str | None:
    """Why ``target`` cannot be searched here (None when it can)."""
    if target.execution_provider != "cpu" or target.precision != "int4":
        return (f"--search measures slmops' int4 quantizer on the cpu execution provider; target {target.name} "
                f"({target.execution_provider}, {target.precision}) is built with its fixed recipe")
    return None


# ---- quantizing the candidates from one export ---------------------------------------------------
def set_accuracy_levels(model_dir: Path, accuracy: int, fp32_last: int) -> None:
    """Rewrite the int4 MatMulNBits' accuracy_level attributes of an already quantized graph
    (the weights do not change: the same block quantization serves every level)."""
    import onnx

    from slmops_build.quantize import _layer_of

    path = model_dir / MODEL_FILE
    proto = onnx.load(str(path), load_external_data=False)
    layers = [_layer_of(n.name) for n in proto.graph.node]
    # decoder layers are the ones with weight MatMuls (the builder names the final norm layers.<N> too)
    first = max((i for n, i in zip(proto.graph.node, layers, strict=True) if i is not None and n.op_type == "MatMulNBits"),
                default=-1) + 1 - fp32_last
    for node, layer in zip(proto.graph.node, layers, strict=True):
        if node.op_type != "MatMulNBits" or not any(a.name == "bits" and a.i == 4 for a in node.attribute):
            continue
        level = 1 if fp32_last > 0 and layer is not None and layer >= first else accuracy
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
    tmp = path.with_suffix(".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)


def quantize_candidates(fp32_dir: Path, work: Path, target: Target, extra_options: dict[str, str],
                        chosen: list[Candidate], log: Callable[[str], None]) -> dict[str, Path]:
    """A model folder per candidate: one quantization per block size, copies that differ only in
    MatMulNBits attributes for the other accuracy levels (the weights file is hard-linked)."""
    from slmops_build.quantize import merged_options, quantize_graph

    by_block: dict[int, Path] = {}
    dirs: dict[str, Path] = {}
    for cand in chosen:
        out = work / cand.name
        if cand.block not in by_block:
            t0 = time.time()
            shutil.copytree(fp32_dir, out)
            quantize_graph(out, 4, merged_options(target, {**extra_options, **cand.options}))
            log(f"  quantized {cand.name} ({time.time() - t0:.1f} s)")
            by_block[cand.block] = out
        else:
            src = by_block[cand.block]
            out.mkdir(parents=True)
            for path in src.iterdir():
                if path.name.endswith(".data"):
                    _link_or_copy(path, out / path.name)
                else:
                    shutil.copy2(path, out / path.name)
        set_accuracy_levels(out, int(cand.options.get("accuracy_level", 4)), int(cand.options.get("fp32_last_layers", 0)))
        dirs[cand.name] = out
    return dirs


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


# ---- PyTorch's answers, once ----------------------------------------------------------------------
@dataclass
class Reference:
    """One adapter's eval rows and PyTorch fp32+PEFT's greedy answers on them."""

    name: str
    onnx_path: Path
    prompt_ids: list[list[int]]
    torch: TorchAnswers  # PyTorch's answers, the tokens generated and their margins
    references: list[str]
    label_task: bool
    max_new_tokens: int
    torch_rows: list[float] = field(default_factory=list)
    metric: str = ""


@dataclass
class PytorchSide:
    references: dict[str, Reference]
    texts: list[list[int]]  # token ids of held-out texts, for perplexity
    torch_nll: list[tuple[float, int]]
    eos: set[int]
    decode: Callable[[list[int]], str]
    seconds: float


def pytorch_side(hf_model_dir: Path, adapters: dict[str, tuple[Any, Path]], bounds: Any, eos: set[int]) -> PytorchSide:
    """PyTorch fp32+PEFT greedy answers on every adapter's rows, and fp32 NLL of the texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops_build.validate import _load_peft, _nll, eval_set, quiet_transformers, row_scores, torch_greedy

    started = time.time()
    quiet_transformers()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32)
    base.eval()
    model = _load_peft(base, {n: a for n, (a, _) in adapters.items()})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos or {0})

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    refs: dict[str, Reference] = {}
    texts: list[list[int]] = []
    for name, (adapter, onnx_path) in adapters.items():
        data = eval_set(adapter, tokenizer, bounds)
        if data.skipped:
            raise SearchError(f"adapter {name}: {data.skipped}; the search compares against the run's eval rows")
        prompt_ids = [list(tokenizer(p, add_special_tokens=not data.chat)["input_ids"]) for p in data.prompts]
        texts += [list(tokenizer(t, add_special_tokens=not data.chat)["input_ids"])[:256] for t in data.texts[:bounds.ppl_texts]]
        model.set_adapter(name)
        answers = torch_greedy(model, prompt_ids, data.max_new_tokens, eos, pad, bounds.torch_batch_size)
        metric, torch_rows = row_scores([decode(a) for a in answers.tokens], data.references, data.label_task)
        refs[name] = Reference(name, onnx_path, prompt_ids, answers, data.references, data.label_task,
                               data.max_new_tokens, torch_rows, metric)
    nll = []
    with torch.no_grad(), model.disable_adapter():
        for ids in texts:
            nll.append(_nll(model(input_ids=torch.tensor([ids])).logits[0].float().numpy(), ids))
    return PytorchSide(refs, texts, nll, eos, decode, round(time.time() - started, 2))


class SearchError(Exception):
    """The search cannot run (no eval rows to compare on) or no candidate is within the budget."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


# ---- measuring one candidate ----------------------------------------------------------------------
def quality(model_dir: Path, template: LoraTemplate, side: PytorchSide, bounds: Any, threads: int) -> dict[str, Any]:
    """Paired agreement, metric drop with its noise margin per adapter; base perplexity vs fp32."""
    import numpy as np

    from slmops.contract import check_adapter_file
    from slmops.runtime import LocalModel
    from slmops_build.validate import (
        OrtScorer,
        _nll,
        _ppl,
        answer_margins,
        expected_agreement,
        paired_drop,
        row_scores,
    )

    started = time.time()
    scorer = OrtScorer(model_dir, threads=threads)
    local: LocalModel | None = None
    out: dict[str, Any] = {"adapters": {}}
    for name, ref in side.references.items():
        feeds = check_adapter_file(ref.onnx_path, template).tensors
        predictions: list[list[int]] = []
        shifts: list[float] = []
        same = 0
        for ids, answer, path, margins in zip(ref.prompt_ids, ref.torch.tokens, ref.torch.paths, ref.torch.margins,
                                              strict=True):
            logits = scorer.logits(ids + path, feeds)[len(ids) - 1:]
            shifts += [b - t for b, t in zip(answer_margins(logits, path), margins, strict=True)]
            picks = logits.argmax(-1)
            agrees = all(int(picks[i]) == tok for i, tok in enumerate(answer))
            if len(path) > len(answer):  # PyTorch stopped there: the bundle must pick an EOS too
                agrees = agrees and int(picks[len(answer)]) in side.eos
            if agrees:
                same += 1
                predictions.append(answer)
                continue
            if local is None:  # only rows that differ are decoded, by the server's runtime
                local = LocalModel(model_dir, template, threads=threads)
            if name not in local.adapters:
                local.load_adapter(name, ref.onnx_path)
            predictions.append(local.generate(ids, ref.max_new_tokens, name))
        _, rows = row_scores([side.decode(p) for p in predictions], ref.references, ref.label_task)
        drop, margin = paired_drop(rows, ref.torch_rows)
        n = len(ref.prompt_ids)
        expected, sigma = expected_agreement(ref.torch.margins, shifts)
        out["adapters"][name] = {
            "rows": n, "rows_same": same, "agreement": round(same / n, 4), "expected_agreement": round(expected, 4),
            "margin_shift_rms": round(sigma, 4), "metric": ref.metric,
            "bundle": round(float(np.mean(rows)), 4), "pytorch": round(float(np.mean(ref.torch_rows)), 4),
            "drop_points": round(drop, 2), "noise_margin_points": round(margin, 2),
        }
    bundle_nll = [_nll(scorer.logits(ids), ids) for ids in side.texts]
    ppl, ppl_fp32 = _ppl(bundle_nll), _ppl(side.torch_nll)
    out["perplexity"] = round(ppl, 4)
    out["perplexity_fp32"] = round(ppl_fp32, 4)
    out["ppl_increase_pct"] = round((ppl / ppl_fp32 - 1) * 100, 3)
    out["quality_s"] = round(time.time() - started, 2)
    return out


def budget_failures(q: dict[str, Any], bounds: Any) -> list[str]:
    """Why a candidate is outside the budget (empty = within)."""
    from slmops_build.validate import agreement_fails, agreement_failure

    why = []
    for name, entry in q["adapters"].items():
        if agreement_fails(entry["rows_same"], entry["rows"], bounds.min_agreement):
            why.append(agreement_failure(name, entry["rows_same"], entry["rows"], bounds.min_agreement))
        elif entry["expected_agreement"] < bounds.min_agreement:
            why.append(f"adapter {name}: expected agreement on unseen rows {entry['expected_agreement']:.1%} < "
                       f"{bounds.min_agreement:.0%} (answer margins moved by {entry['margin_shift_rms']} logits rms)")
        if entry["drop_points"] > bounds.max_accuracy_drop and entry["drop_points"] > entry["noise_margin_points"]:
            why.append(f"adapter {name}: {entry['metric']} drop {entry['drop_points']} points > {bounds.max_accuracy_drop} "
                       f"(noise {entry['noise_margin_points']})")
    if not q["ppl_increase_pct"] <= bounds.max_ppl_increase:
        why.append(f"perplexity +{q['ppl_increase_pct']}% > {bounds.max_ppl_increase}%")
    return why


def speeds(dirs: dict[str, Path], template: LoraTemplate, adapters: dict[str, Path], prompt: list[int],
           threads: int, rounds: int = SPEED_ROUNDS, tokens: int = SPEED_TOKENS) -> dict[str, dict[str, float]]:
    """Decode tok/s per candidate: one stream without an adapter and with each, and MIXED_STREAMS
    streams of mixed adapters in one batch. Warm (one untimed run each), the candidates interleaved
    round by round, medians."""
    import numpy as np

    from slmops.runtime import LocalModel
    from slmops.runtime.runner import ModelRunner

    models: dict[str, LocalModel] = {}
    batch: dict[str, ModelRunner] = {}
    for name, model_dir in dirs.items():
        models[name] = LocalModel(model_dir, template, threads=threads)
        for adapter_name, path in adapters.items():
            models[name].load_adapter(adapter_name, path)
        batch[name] = ModelRunner(model_dir, template, rows=MIXED_STREAMS, threads=threads)
    cases: list[str | None] = [None, *adapters]
    mix = [cases[i % len(cases)] for i in range(MIXED_STREAMS)]
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in dirs}

    def one_stream(model: LocalModel, adapter: str | None) -> float:
        stream = model.stream(prompt, tokens + 1, adapter, stop_at_eos=False)
        next(stream)  # the first token comes from the prefill
        t0 = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - t0)

    def mixed(runner: ModelRunner, model: LocalModel) -> float:
        assert runner.bank is not None
        feeds_of = {a: runner.bank.feeds([(a, model.adapters[a])]) if a is not None else {} for a in set(mix)}
        lengths = np.zeros(MIXED_STREAMS, np.int64)
        last = np.zeros(MIXED_STREAMS, np.int64)
        for row, adapter in enumerate(mix):
            logits = runner.prefill(row, np.asarray(prompt, np.int64), 0, feeds_of[adapter], adapter)
            last[row] = int(np.argmax(logits))
            lengths[row] = len(prompt)
        feeds = runner.bank.feeds([(a, model.adapters[a]) if a is not None else None for a in mix])
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = runner.decode(last, lengths, feeds, tuple(mix))
            last = np.asarray(logits.argmax(-1), np.int64)
            lengths = lengths + 1
        return tokens * MIXED_STREAMS / (time.perf_counter() - t0)

    for warm in (True, *([False] * rounds)):
        for name in dirs:
            for adapter in cases:
                value = one_stream(models[name], adapter)
                if not warm:
                    samples[name].setdefault(adapter or "base", []).append(value)
            value = mixed(batch[name], models[name])
            if not warm:
                samples[name].setdefault(f"mixed{MIXED_STREAMS}", []).append(value)
    result: dict[str, dict[str, float]] = {}
    for name, cases_of in samples.items():
        medians = {case: round(statistics.median(values), 1) for case, values in cases_of.items()}
        one = [v for k, v in medians.items() if not k.startswith("mixed")]
        medians["one_stream_mean"] = round(sum(one) / len(one), 1)
        result[name] = medians
    return result


# ---- the whole search -----------------------------------------------------------------------------
def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Candidates no other beats on both decode speed and the lowest adapter agreement."""
    points = [(r["name"], r["speed"]["one_stream_mean"], r["min_agreement"]) for r in rows if r.get("speed")]
    front: list[str] = []
    for name, speed, agree in points:
        if not any(s >= speed and a >= agree and (s > speed or a > agree) for other, s, a in points if other != name):
            front.append(name)
    return front


def run_search(model_dir: Path, fp32_dir: Path, work: Path, target: Target, template: LoraTemplate,
               adapters: dict[str, tuple[Any, Path]], bounds: Any, extra_options: dict[str, str],
               log: Callable[[str], None], threads: int = 2,
               chosen: list[Candidate] | None = None) -> tuple[Path, dict[str, Any]]:
    """Measure every candidate; return the picked candidate's model folder and the search report.

    Raises:
        SearchError: no eval rows to compare on, or no candidate within the budget (the report's
            table is in ``SearchError.report``).
    """
    started = time.time()
    chosen = chosen or candidates(target)
    if not adapters:
        raise SearchError("--search compares adapters' answers with PyTorch's: pass at least one --adapter with its run")
    timings: dict[str, float] = {}
    t0 = time.time()
    from slmops.contract import GenaiConfig

    side = pytorch_side(model_dir, adapters, bounds, set(GenaiConfig.read(fp32_dir).eos_ids))
    timings["pytorch_s"] = round(time.time() - t0, 2)
    log(f"  PyTorch fp32+PEFT answers on {sum(len(r.prompt_ids) for r in side.references.values())} eval rows "
        f"({timings['pytorch_s']} s)")
    t0 = time.time()
    dirs = quantize_candidates(fp32_dir, work, target, extra_options, chosen, log)
    timings["quantize_s"] = round(time.time() - t0, 2)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for cand in chosen:
        q = quality(dirs[cand.name], template, side, bounds, threads)
        why = budget_failures(q, bounds)
        agree = min(min(e["agreement"], e["expected_agreement"]) for e in q["adapters"].values())
        rows.append({"name": cand.name, "options": cand.options, "note": cand.note, "quality": q,
                     "min_agreement": agree, "within_budget": not why, "outside_budget": why})
        log(f"  {cand.name}: agreement " + ", ".join(f"{n} {e['rows_same']}/{e['rows']}" for n, e in q["adapters"].items())
            + f"; perplexity +{q['ppl_increase_pct']}%" + ("" if not why else " -- outside the budget"))
    timings["quality_s"] = round(time.time() - t0, 2)
    t0 = time.time()
    prompt = side.references[next(iter(side.references))].prompt_ids[0]
    measured = speeds(dirs, template, {n: p for n, (_, p) in adapters.items()}, prompt, threads)
    timings["speed_s"] = round(time.time() - t0, 2)
    for row in rows:
        row["speed"] = measured[row["name"]]
    default = rows[0]["speed"]["one_stream_mean"] or 1.0
    for row in rows:
        row["speed_vs_default"] = round(row["speed"]["one_stream_mean"] / default, 3)
    within = [r for r in rows if r["within_budget"]]
    report: dict[str, Any] = {
        "budget": {"max_accuracy_drop_points": bounds.max_accuracy_drop, "min_agreement": bounds.min_agreement,
                   "max_ppl_increase_pct": bounds.max_ppl_increase},
        "rows": {n: len(r.prompt_ids) for n, r in side.references.items()},
        "speed_method": f"decode tok/s, {SPEED_TOKENS} tokens, {threads} threads, median of {SPEED_ROUNDS} rounds after a "
                        f"warm-up, candidates interleaved; one_stream_mean = mean of no adapter and each adapter; "
                        f"mixed{MIXED_STREAMS} = {MIXED_STREAMS} streams of mixed adapters in one batch",
        "quality_method": "teacher-forced paired agreement on PyTorch fp32+PEFT greedy answers (eval rows); differing "
                          "rows decoded by the server's runtime and scored",
        "candidates": rows,
        "pareto_front": pareto_front(rows),
    }
    if not within:
        report.update(pick=None, reason="no candidate is within the budget", timings=timings,
                      seconds=round(time.time() - started, 2))
        raise SearchError("no candidate is within the budget: " + "; ".join(f"{r['name']}: {r['outside_budget'][0]}" for r in rows),
                          report)
    pick = max(within, key=lambda r: r["speed"]["one_stream_mean"])
    slower_out = [r["name"] for r in rows if not r["within_budget"] and r["speed"]["one_stream_mean"] > pick["speed"]["one_stream_mean"]]
    reason = (f"{pick['name']}: the fastest of {len(within)}/{len(rows)} candidates within the budget "
              f"({pick['speed']['one_stream_mean']} tok/s one stream, {pick['speed_vs_default']}x the default; lowest "
              f"adapter agreement {pick['min_agreement']:.0%})")
    if slower_out:
        reason += f"; faster but outside the budget: {', '.join(slower_out)}"
    timings["total_s"] = round(time.time() - started, 2)
    report.update(pick=pick["name"], pick_options=pick["options"], reason=reason, timings=timings,
                  seconds=timings["total_s"])
    # for the build's validation of the pick (same rows): not recorded in bundle.json
    report["_torch_answers"] = {n: r.torch for n, r in side.references.items()}
    return dirs[pick["name"]], report
