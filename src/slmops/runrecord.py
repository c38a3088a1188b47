"""run.json: the contract between the train stage (writer) and the build stage (reader).

A train run folder holds ``adapter/`` (PEFT), ``run.json`` and ``validation/<split>.jsonl``: the
eval and test rows rendered as training rendered them, one JSON object a line with ``prompt``
(text, special tokens of a chat template included), ``reference`` (the answer it is scored
against) and ``text`` (prompt + answer, for perplexity). run.json's ``validation`` section says
how to tokenize them (``chat``: the prompt carries its template's special tokens, so add none),
and ``task`` whether answers are labels (accuracy) or free text (ROUGE-L). The build stage reads
these files only; it never imports the train stage.

Light on purpose (standard library only): the build image reads it without the train package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsUsageError

RUN_JSON = "run.json"
VALIDATION_DIR = "validation"
# Version of run.json's schema; the build refuses any other, by name.
#   1: no rendered validation rows (the build re-rendered the training data with the train code).
#   2: ``validation`` section + ``validation/<split>.jsonl`` rows, written by the train stage.
RUN_SCHEMA_VERSION = 2
RUN_SCHEMA_CHANGES = {1: "version 1 has no rendered validation rows (validation/*.jsonl)"}
RETRAIN = "retrain the adapter with this slmops (`slmops train ... --overwrite`)"


class RunRecordError(ValueError):
    """Validation rows of a run that cannot be read (missing, corrupt): the parity check cannot run."""


def read_run_record(run_dir: str | Path, option: str = "--adapter") -> dict[str, Any]:
    """run.json of ``run_dir``; a missing, unreadable or other-version file is refused on one line."""
    path = Path(run_dir) / RUN_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlmopsUsageError(option, f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); {RETRAIN}") from exc
    if not isinstance(data, dict):
        raise SlmopsUsageError(option, f"{path} holds a JSON {type(data).__name__}, not a run record; {RETRAIN}")
    version = data.get("schema_version")
    if version != RUN_SCHEMA_VERSION:
        why = f" ({RUN_SCHEMA_CHANGES[version]})" if version in RUN_SCHEMA_CHANGES else ""
        raise SlmopsUsageError(option, f"{path}: schema_version {version!r} is not supported (this slmops reads "
                               f"{RUN_SCHEMA_VERSION}){why}; {RETRAIN}")
    return data


def write_validation_rows(run_dir: Path, split: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Write ``validation/<split>.jsonl``; return its run.json entry (file relative to the run)."""
    rel = f"{VALIDATION_DIR}/{split}.jsonl"
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"prompt": row["prompt"], "reference": row["reference"], "text": row["text"]},
                              ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path.write_bytes(data)
    return {"file": rel, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class ValidationRows:
    """One split's rendered rows of a run, as validation scores them."""

    prompts: list[str]
    references: list[str]
    texts: list[str]  # prompt + answer, for perplexity
    chat: bool  # the prompts carry their chat template's special tokens: tokenize without adding any
    label_task: bool  # answers are labels (accuracy), else free text (ROUGE-L)
    max_new_tokens: int | None  # the run's eval_max_new_tokens, if it set one
    source: str  # "<run name>/validation/<split>.jsonl (<split> split '<name>')": no path of this machine
    sha256: str


def read_validation_rows(run_dir: str | Path, record: dict[str, Any], split: str) -> ValidationRows | None:
    """The run's rendered ``split`` rows ("eval" or "test"); None when the run has no such split.

    Raises RunRecordError when the rows are listed but cannot be read (moved, corrupt, edited).
    """
    section = record.get("validation") or {}
    entry = (section.get("splits") or {}).get(split)
    if not entry:
        return None
    path = Path(run_dir) / str(entry["file"])
    try:
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        prompts = [str(r["prompt"]) for r in rows]
        references = [str(r["reference"]) for r in rows]
        texts = [str(r["text"]) for r in rows]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        # an OSError's text would name this machine's folders: its reason only
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:120]
        raise RunRecordError(f"{entry['file']} cannot be read ({type(exc).__name__}: {reason})") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        raise RunRecordError(f"{entry['file']} does not match its sha256 in {RUN_JSON} (edited after training?)")
    name = record.get("name") or Path(run_dir).name
    return ValidationRows(prompts=prompts, references=references, texts=texts, chat=bool(section.get("chat")),
                          label_task=(record.get("task") or {}).get("type") == "classification",
                          max_new_tokens=section.get("max_new_tokens"),
                          source=f"{name}/{entry['file']} ({split} split '{entry.get('split', split)}')", sha256=digest)
