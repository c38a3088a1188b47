"""Task metrics on generated answers. Computed with rouge-score, sacrebleu and scikit-learn
directly: the `evaluate` package fetches metric code from the hub and fails offline."""

from __future__ import annotations

import math
from collections.abc import Sequence

# A task whose answers come from at most this many distinct short strings is a label task.
MAX_LABELS = 32
MAX_LABEL_WORDS = 3


def is_label_task(train_references: Sequence[str]) -> bool:
    distinct = set(train_references)
    return 0 < len(distinct) <= MAX_LABELS and all(len(r.split()) <= MAX_LABEL_WORDS for r in distinct)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def classification_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    labels = sorted(set(refs))
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs, strict=True)) / max(len(refs), 1),
        "macro_f1": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    exact = [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
    n = max(len(references), 1)
    return {"rouge_l": sum(rouge) / n, "bleu": float(bleu), "exact_match": sum(exact) / n}


def task_metrics(predictions: Sequence[str], references: Sequence[str], label_task: bool) -> dict[str, float]:
    return classification_metrics(predictions, references) if label_task else generation_metrics(predictions, references)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


GREATER_IS_BETTER = {"eval_loss": False, "eval_perplexity": False}


def greater_is_better(metric: str) -> bool:
    return GREATER_IS_BETTER.get(metric, True)
