from pathlib import Path

import pytest
from slmops_train.config import build_config
from slmops_train.data import IGNORE_INDEX, Collator, ExampleRenderer, load_splits, pack_dataset, prepare_data

from slmops.errors import SlmopsUsageError
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _cfg(tiny_data: dict, **kw):
    values = {"data_files": [str(tiny_data["tone_train"])], "text_template": "Tone of: {phrase}\n{tone}", "eval_split": "none"}
    return build_config({**values, **kw})


def test_template_loss_covers_only_the_answer(tiny_data, tokenizer) -> None:
    data = prepare_data(_cfg(tiny_data), tokenizer)
    row = data.train[0]
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
    answer = tokenizer.decode(labelled)
    assert answer.endswith(tokenizer.eos_token)
    assert answer.removesuffix(tokenizer.eos_token) in {"joy", "sadness", "anger", "fear", "surprise"}
    assert row["labels"][0] == IGNORE_INDEX
    assert data.labels == sorted(set(data.labels)) and set(data.labels) <= {"joy", "sadness", "anger", "fear", "surprise"}


def test_full_text_option_trains_on_every_token(tiny_data, tokenizer) -> None:
    data = prepare_data(_cfg(tiny_data, train_on_full_text=True), tokenizer)
    assert IGNORE_INDEX not in data.train[0]["labels"]


def test_chat_template_answer_is_the_assistant_turn(tiny_data, tokenizer) -> None:
    cfg = _cfg(tiny_data, use_chat_template=True, system_prompt="Be brief.")
    renderer = ExampleRenderer(cfg, tokenizer, ["phrase", "tone"])
    prompt, answer, reference = renderer.render({"phrase": "I won!", "tone": "joy"})
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n") and "Tone of: I won!" in prompt
    assert answer == "joy<|im_end|>\n" and reference == "joy"


def test_chat_with_input_output_columns(tmp_path, tokenizer) -> None:
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}] * 3)
    cfg = build_config({"data_files": [str(f)], "use_chat_template": True, "eval_split": "none"})
    prompt, answer, ref = ExampleRenderer(cfg, tokenizer, ["question", "answer"]).render({"question": "2+2?", "answer": "4"})
    assert "<|im_start|>user\n2+2?<|im_end|>" in prompt and ref == "4"


def test_template_field_missing_from_data_names_the_option(tiny_data, tokenizer) -> None:
    with pytest.raises(SlmopsUsageError) as err:
        prepare_data(_cfg(tiny_data, text_template="{sentence} -> {tone}"), tokenizer)
    assert err.value.option == "--text_template" and "sentence" in err.value.message


def test_missing_file_and_bad_extension(tmp_path, tiny_data) -> None:
    with pytest.raises(SlmopsUsageError) as err:
        load_splits(build_config({"data_files": [str(tmp_path / "nope.jsonl")]}))
    assert err.value.option == "--data_files" and "does not exist" in err.value.message
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(SlmopsUsageError, match="extension"):
        load_splits(build_config({"data_files": [str(bad)]}))


def test_slices_and_empty_split(tiny_data) -> None:
    train, eval_ds = load_splits(_cfg(tiny_data, train_split="train[:12]", eval_split="train[12:15]"))
    assert (len(train), len(eval_ds)) == (12, 3)
    with pytest.raises(SlmopsUsageError) as err:
        load_splits(_cfg(tiny_data, train_split="train[5:5]"))
    assert err.value.option == "--train_split" and "no rows" in err.value.message
    with pytest.raises(SlmopsUsageError) as err:
        load_splits(_cfg(tiny_data, eval_split="validation"))
    assert err.value.option == "--eval_split"


def test_auto_eval_split_holds_out_rows(tiny_data) -> None:
    train, eval_ds = load_splits(_cfg(tiny_data, eval_split="auto"))
    assert len(train) == 18 and len(eval_ds) == 2


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet(tmp_path, tiny_data, tokenizer, fmt) -> None:
    import pandas as pd

    df = pd.read_json(tiny_data["tone_train"], lines=True)
    path = tmp_path / f"tone.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    data = prepare_data(build_config({"data_files": [str(path)], "text_template": "{phrase}\n{tone}", "eval_split": "none"}), tokenizer)
    assert len(data.train) == 20


def test_packing_keeps_samples_from_attending_to_each_other(tiny_data, tokenizer, tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = prepare_data(_cfg(tiny_data, max_seq_len=64), tokenizer)
    packed = pack_dataset(data.train, 64)
    assert len(packed) < len(data.train)
    assert all(len(r["input_ids"]) <= 64 for r in packed)
    assert sum(r["position_ids"].count(0) for r in packed) == len(data.train)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    row = next(r for r in packed if r["position_ids"].count(0) >= 2)
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    batch = Collator(tokenizer.pad_token_id)([row])
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for a, b in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=torch.tensor([row["input_ids"][a:b]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-4, rtol=1e-4)
    # the first token of each packed sample is never a target of the previous sample
    assert all(row["labels"][s] == IGNORE_INDEX for s in starts[:-1])
