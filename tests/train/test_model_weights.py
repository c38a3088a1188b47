"""The default-model converter's guards on a tiny Llama: every weight must arrive (only the tied head
may be absent), nothing may be left over, and a prepared folder's weights are hashed again rather
than taken from its marker file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.errors import SlmopsUsageError
from slmops.fsutil import sha256_files
from slmops.models import PREPARED_MARKER, check_prepared_model, copy_weights, model_weights_sha256


def _tiny(tied: bool = True):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def test_copy_weights_allows_only_the_tied_head_to_be_missing() -> None:
    import torch

    source = _tiny()
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    target = _tiny()
    torch.nn.init.zeros_(target.model.embed_tokens.weight)
    copy_weights(target, state, "tiny.gguf")  # tied: the head is the embeddings
    assert torch.equal(target.model.embed_tokens.weight, source.model.embed_tokens.weight)

    with pytest.raises(SlmopsUsageError) as err:  # untied: the head is a weight of its own
        copy_weights(_tiny(tied=False), state, "tiny.gguf")
    assert "1 weight(s) missing" in err.value.message and "lm_head.weight" in err.value.message

    without_layer = {k: v for k, v in state.items() if "layers.0.mlp.down_proj" not in k}
    with pytest.raises(SlmopsUsageError) as err:
        copy_weights(_tiny(), without_layer, "tiny.gguf")
    assert "model.layers.0.mlp.down_proj.weight" in err.value.message and "tiny.gguf" in err.value.message

    with pytest.raises(SlmopsUsageError) as err:
        copy_weights(_tiny(), {**state, "model.layers.1.self_attn.q_proj.weight": torch.zeros(16, 16)}, "tiny.gguf")
    assert "1 unexpected" in err.value.message and "layers.1" in err.value.message


def test_a_tampered_prepared_model_is_detected(tmp_path: Path) -> None:
    folder = tmp_path / "prepared"
    _tiny().save_pretrained(folder)
    weights = sorted(folder.glob("*.safetensors"))
    (folder / PREPARED_MARKER).write_text(json.dumps({"name": "tiny", "source": "tiny.gguf",
                                                       "weights_sha256": sha256_files(weights)}))
    assert model_weights_sha256(folder) == sha256_files(weights)
    data = bytearray(weights[0].read_bytes())
    data[-5] ^= 0xFF  # one weight byte, the header intact: it still loads
    weights[0].write_bytes(bytes(data))
    actual, problem = check_prepared_model(folder)
    assert actual == sha256_files(weights) and problem and "recorded in slmops_model.json" in problem
    with pytest.raises(SlmopsUsageError) as err:
        model_weights_sha256(folder)
    assert str(folder) in err.value.message and "slmops model prepare --force" in err.value.message
