"""Load datasets, render prompts/answers and tokenize with answer-only labels (and packing)."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsUsageError
from slmops.fsutil import sha256_file
from slmops_train.config import TrainConfig

IGNORE_INDEX = -100
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class PreparedData:
    """Tokenized splits plus what evaluation and run.json need."""

    train: Any  # datasets.Dataset with input_ids / labels
    eval: Any | None
    eval_examples: list[dict[str, str]]  # {"prompt", "reference", "text"} for generation metrics and the build
    labels: list[str]  # distinct reference answers of the train split
    fingerprint: dict[str, Any]
    dropped: int
    test: Any | None = None  # the test split: scored once after training, never seen by it
    test_examples: list[dict[str, str]] | None = None
    train_sample: Any | None = None  # the first train rows, unpacked: train figures beside eval and test
    train_examples: list[dict[str, str]] | None = None


# ---- loading --------------------------------------------------------------------------------
def parse_data_files(data_files: list[str]) -> tuple[str, dict[str, list[str]]]:
    """``["a.jsonl", "eval=b.jsonl"]`` -> (format, {"train": ["a.jsonl"], "eval": ["b.jsonl"]})."""
    by_split: dict[str, list[str]] = {}
    formats = set()
    for item in data_files:
        split, _, file = item.rpartition("=")
        path = Path(file)
        if not path.is_file():
            raise SlmopsUsageError("--data_files", f"'{file}' does not exist; pass an existing json, jsonl, csv or parquet file")
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise SlmopsUsageError("--data_files", f"'{file}' has an unknown extension; use .json, .jsonl, .csv or .parquet")
        check_data_file(path, fmt)
        formats.add(fmt)
        by_split.setdefault(split or "train", []).append(str(path))
    if len(formats) > 1:
        raise SlmopsUsageError("--data_files", f"mixed formats {sorted(formats)}; convert the files to one format")
    return formats.pop(), by_split


def check_data_file(path: Path, fmt: str) -> None:
    """An empty file, or a json/jsonl file that is not JSON objects, named with its line and what is wrong
    (instead of datasets' StopIteration / DatasetGenerationError)."""
    option = "--data_files"
    if path.stat().st_size == 0 or (fmt != "parquet" and not path.read_bytes()[:65536].strip()):
        raise SlmopsUsageError(option, f"'{path}' is empty; it needs at least one row")
    if fmt != "json":
        return
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SlmopsUsageError(option, f"'{path}' line {number}, column {exc.colno}: not valid JSON "
                                           f"({exc.msg}); each line must be one JSON object") from exc
                if not isinstance(row, dict):
                    raise SlmopsUsageError(option, f"'{path}' line {number}: a JSON {type(row).__name__}, not an "
                                           "object; each line must be one JSON object like {\"phrase\": ..., \"tone\": ...}")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise SlmopsUsageError(option, f"'{path}' line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from exc
    rows = data if isinstance(data, list) else None
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise SlmopsUsageError(option, f"'{path}' must hold a JSON list of objects (rows), like "
                               '[{"input": ..., "output": ...}]; for one object per line use .jsonl')
    if not rows:
        raise SlmopsUsageError(option, f"'{path}' is an empty list; it needs at least one row")


def _load_split(config: TrainConfig, split: str, option: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        if config.data_files:
            fmt, files = parse_data_files(config.data_files)
            return datasets.load_dataset(fmt, data_files=files, split=split)
        assert config.data_name is not None
        return datasets.load_dataset(config.data_name, split=split)
    except SlmopsUsageError:
        raise
    except (ValueError, KeyError) as exc:
        if "corresponds to no data" in str(exc):
            raise SlmopsUsageError(option, f"'{split}' selects no rows; widen the slice or check the data") from exc
        raise SlmopsUsageError(option, f"'{split}' cannot be read: {exc}; use an existing split with a valid slice") from exc
    except Exception as exc:  # noqa: BLE001 - hub / file errors get one clear message
        if config.data_name:
            raise SlmopsUsageError(
                "--data_name",
                f"'{config.data_name}' could not be loaded ({type(exc).__name__}: {str(exc)[:160]}); "
                "offline, pass local files with --data_files",
            ) from exc
        raise SlmopsUsageError("--data_files", f"could not be read: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _available_splits(config: TrainConfig) -> list[str]:
    if config.data_files:
        return list(parse_data_files(config.data_files)[1])
    try:
        import datasets

        return list(datasets.get_dataset_split_names(config.data_name))
    except Exception:  # noqa: BLE001
        return []


def load_splits(config: TrainConfig) -> tuple[Any, Any | None]:
    """Return (train, eval) ``datasets.Dataset`` objects as the config's splits say."""
    train = _load_split(config, config.train_split, "--train_split")
    eval_ds = None
    if config.eval_split == "auto":
        base = config.train_split.split("[")[0]
        named = [s for s in ("validation", "eval", "test") if s in _available_splits(config) and s != base]
        if named:
            eval_ds = _load_split(config, named[0], "--eval_split")
        elif len(train) >= 10:
            parts = train.train_test_split(test_size=config.eval_fraction, seed=config.seed, shuffle=True)
            train, eval_ds = parts["train"], parts["test"]
    elif config.eval_split not in (None, "none"):
        eval_ds = _load_split(config, config.eval_split, "--eval_split")
    if len(train) == 0:
        raise SlmopsUsageError("--train_split", f"'{config.train_split}' selects no rows; widen the slice or check the data")
    if eval_ds is not None and len(eval_ds) == 0:
        raise SlmopsUsageError("--eval_split", f"'{config.eval_split}' selects no rows; widen the slice or pass --eval_split none")
    if config.max_samples:
        train = train.select(range(min(config.max_samples, len(train))))
    return train, eval_ds


def load_test_split(config: TrainConfig) -> Any | None:
    """The ``--test_split`` rows, or None."""
    if config.test_split in (None, "none"):
        return None
    test = _load_split(config, config.test_split, "--test_split")
    if len(test) == 0:
        raise SlmopsUsageError("--test_split", f"'{config.test_split}' selects no rows; widen the slice or drop --test_split")
    for other, option in ((config.train_split, "--train_split"), (config.eval_split, "--eval_split")):
        if other == config.test_split:
            raise SlmopsUsageError("--test_split", f"'{other}' is also the {option}; test rows must be unseen, name another split")
    return test


# ---- rendering ------------------------------------------------------------------------------
def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


class ExampleRenderer:
    """Turns a data row into (prompt, answer) text: the loss covers the answer only."""

    def __init__(self, config: TrainConfig, tokenizer: Any, columns: list[str]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.columns = columns
        self.template = config.text_template
        self.output_field = config.output_field
        self.input_field = config.input_field
        if self.template:
            fields = template_fields(self.template)
            if not fields:
                raise SlmopsUsageError("--text_template", "has no {field}; name the data columns in braces, e.g. '{phrase} -> {tone}'")
            missing = [f for f in fields if f not in columns]
            if missing:
                raise SlmopsUsageError(
                    "--text_template", f"field(s) {missing} not in the data columns {columns}; fix the template or the data"
                )
            self.output_field = self.output_field or fields[-1]
            if self.output_field not in fields:
                raise SlmopsUsageError("--output_field", f"'{self.output_field}' is not a field of --text_template")
            marker = "{" + self.output_field + "}"
            cut = self.template.index(marker)
            self.prompt_part, self.answer_part = self.template[:cut], self.template[cut:]
        elif config.use_chat_template:
            if "messages" in columns:
                return
            self.input_field = self.input_field or _first(columns, ("input", "prompt", "question", "instruction"))
            self.output_field = self.output_field or _first(columns, ("output", "response", "answer", "completion"))
            for opt, name in (("--input_field", self.input_field), ("--output_field", self.output_field)):
                if not name or name not in columns:
                    raise SlmopsUsageError(opt, f"'{name}' is not a data column {columns}; name the {opt[2:]} column")
        else:
            self.text_field: str = config.text_field or "text"
            if self.text_field not in columns:
                raise SlmopsUsageError(
                    "--text_template",
                    f"no template and no text column in {columns}; pass --text_template, --use_chat_template or --text_field",
                )
        if config.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise SlmopsUsageError("--use_chat_template", "the tokenizer has no chat template; use --text_template instead")

    def render(self, row: dict[str, Any]) -> tuple[str, str, str]:
        """Return (prompt, answer, reference): answer is what the model learns (with end-of-turn
        tokens), reference the plain answer text generation is scored against."""
        if self.template:
            values = {k: "" if v is None else str(v) for k, v in row.items()}
            prompt = self.prompt_part.format(**values)
            answer = self.answer_part.format(**values)
            if not self.config.use_chat_template:
                return prompt, answer + (self.tokenizer.eos_token or ""), answer.strip()
            return self._chat([{"role": "user", "content": prompt.strip()}], answer.strip())
        if self.config.use_chat_template:
            if "messages" in row and row.get("messages"):
                messages = list(row["messages"])
                if messages[-1].get("role") != "assistant":
                    raise SlmopsUsageError("--use_chat_template", "each 'messages' row must end with an assistant turn")
                return self._chat(messages[:-1], str(messages[-1]["content"]))
            assert self.input_field and self.output_field
            return self._chat([{"role": "user", "content": str(row[self.input_field])}], str(row[self.output_field]))
        text = str(row[self.text_field])
        return "", text + (self.tokenizer.eos_token or ""), text

    def _chat(self, messages: list[dict[str, str]], answer: str) -> tuple[str, str, str]:
        if self.config.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise SlmopsUsageError("--use_chat_template", "the chat template renders the prompt differently with an answer; use --text_template")
        return prompt, full[len(prompt):], answer.strip()


def _first(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in columns), None)


# ---- tokenization ---------------------------------------------------------------------------
def tokenize_example(tokenizer: Any, prompt: str, answer: str, max_len: int, full_text_loss: bool,
                     add_special_tokens: bool) -> dict[str, list[int]] | None:
    """Prompt and answer are tokenized separately, as at inference (prompt in, answer out)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] if prompt else []
    answer_ids = tokenizer(answer, add_special_tokens=add_special_tokens and not prompt)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if not full_text_loss else list(prompt_ids)) + answer_ids
    labels = labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def prepare_data(config: TrainConfig, tokenizer: Any, train_sample_rows: int = 0) -> PreparedData:
    """Tokenized train/eval(/test) splits; ``train_sample_rows`` unpacked train rows for train figures."""
    import datasets

    train_raw, eval_raw = load_splits(config)
    test_raw = load_test_split(config)
    renderer = ExampleRenderer(config, tokenizer, list(train_raw.column_names))
    # Chat templates carry their own BOS; plain text gets the tokenizer's special tokens.
    add_special = not config.use_chat_template

    def tokenize_split(raw: Any) -> tuple[Any, list[dict[str, str]], list[str], int]:
        rows, examples, refs, dropped = [], [], [], 0
        for row in raw:
            prompt, answer, reference = renderer.render(row)
            item = tokenize_example(tokenizer, prompt, answer, config.max_seq_len, config.train_on_full_text, add_special)
            if item is None:
                dropped += 1
                continue
            rows.append(item)
            # text: prompt + answer without the end-of-sequence token (base-model perplexity in the build)
            examples.append({"prompt": prompt, "reference": reference,
                             "text": prompt + answer.removesuffix(tokenizer.eos_token or "\0")})
            refs.append(reference)
        return datasets.Dataset.from_list(rows), examples, refs, dropped

    train, train_examples, refs, dropped = tokenize_split(train_raw)
    if len(train) == 0:
        raise SlmopsUsageError("--max_seq_len", f"{config.max_seq_len} truncates every answer away; raise it")
    eval_ds: Any = None
    eval_examples: list[dict[str, str]] = []
    if eval_raw is not None:
        eval_ds, eval_examples, _, _ = tokenize_split(eval_raw)
    test_ds, test_examples = (tokenize_split(test_raw)[:2]) if test_raw is not None else (None, None)
    sample = min(train_sample_rows, len(train))
    train_sample = train.select(range(sample)) if sample else None
    if config.packing:
        train = pack_dataset(train, config.max_seq_len)
    fingerprint = dataset_fingerprint(config, train_raw, eval_raw)
    fingerprint.update(test_split=config.test_split, test_rows=len(test_raw) if test_raw is not None else 0)
    return PreparedData(
        train=train,
        eval=eval_ds,
        eval_examples=eval_examples,
        labels=sorted(set(refs)),
        fingerprint=fingerprint,
        dropped=dropped,
        test=test_ds,
        test_examples=test_examples,
        train_sample=train_sample,
        train_examples=train_examples[:sample] if sample else None,
    )


def dataset_fingerprint(config: TrainConfig, train_raw: Any, eval_raw: Any | None) -> dict[str, Any]:
    files = {}
    if config.data_files:
        for paths in parse_data_files(config.data_files)[1].values():
            files.update({p: sha256_file(p) for p in paths})
    digest = hashlib.sha256(json.dumps([files, train_raw._fingerprint, getattr(eval_raw, "_fingerprint", None)]).encode())
    return {
        "sha256": digest.hexdigest(),
        "files": files,
        "data_name": config.data_name,
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "train_rows": len(train_raw),
        "eval_rows": len(eval_raw) if eval_raw is not None else 0,
        "train_fingerprint": train_raw._fingerprint,
    }


# ---- packing --------------------------------------------------------------------------------
def pack_dataset(dataset: Any, max_len: int) -> Any:
    """First-fit-decreasing bin packing of whole samples into rows of at most ``max_len`` tokens.

    Each row gets ``position_ids`` that restart at 0 for every sample; with no attention mask,
    transformers builds a block-diagonal causal mask from them, so packed samples never attend
    to each other.
    """
    import datasets

    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in order:
        n = len(dataset[idx]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(idx)
                room[b] -= n
                break
        else:
            bins.append([idx])
            room.append(max_len - n)
    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for idx in members:
            item = dataset[idx]
            row["input_ids"] += item["input_ids"]
            # The first token of each sample must not be predicted from the previous sample.
            row["labels"] += [IGNORE_INDEX] + item["labels"][1:]
            row["position_ids"] += list(range(len(item["input_ids"])))
        rows.append(row)
    return datasets.Dataset.from_list(rows)


class Collator:
    """Right-pads a batch; counts the tokens it serves for tokens/s in run.json."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.tokens_seen = 0
        self.counting = True  # off while evaluating: tokens_seen counts training tokens only

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        if packed:
            batch["position_ids"] = []
        else:
            batch["attention_mask"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            self.tokens_seen += n if self.counting else 0
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                # Padding forms its own trailing "sample": it never masks into real tokens.
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
