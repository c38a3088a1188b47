"""Shared tiny fixtures: a 2-layer Llama built from a config, a BPE tokenizer trained on the
fly, and 20-row datasets. Everything is made here; nothing is downloaded."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
)


def _rows(path: Path, n: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """20-row train and 10-row eval files of both demo tasks."""
    root = tmp_path_factory.mktemp("data")
    return {
        "tone_train": write_jsonl(root / "tone_train.jsonl", _rows(EXAMPLES / "tone" / "train.jsonl", 20)),
        "tone_eval": write_jsonl(root / "tone_eval.jsonl", _rows(EXAMPLES / "tone" / "eval.jsonl", 10)),
        "extract_train": write_jsonl(root / "extract_train.jsonl", _rows(EXAMPLES / "extract" / "train.jsonl", 20)),
        "extract_eval": write_jsonl(root / "extract_eval.jsonl", _rows(EXAMPLES / "extract" / "eval.jsonl", 10)),
    }


def make_tiny_tokenizer(out: Path):
    """A 400-token byte-level BPE trained on the demo data, with a ChatML template, saved into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [line for sub in ("tone", "extract") for f in ("train.jsonl", "eval.jsonl")
              for line in (EXAMPLES / sub / f).read_text().splitlines()]
    corpus += ["Classify the tone of this phrase as joy, sadness, anger, fear or surprise:", "user assistant system"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def make_tiny_llama(out: Path) -> Path:
    """A 2-layer Llama (~50k params, seed 0) with a 400-token BPE tokenizer, saved in ``out`` as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (~50k params) with a 400-token BPE tokenizer, saved as an HF folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def base_args(tiny_model_dir: Path, tiny_data: dict[str, Path], tmp_path: Path) -> dict:
    """TrainConfig values for a fast run on the tiny model."""
    return {
        "model_name_or_path": str(tiny_model_dir),
        "data_files": [f"train={tiny_data['tone_train']}", f"eval={tiny_data['tone_eval']}"],
        "eval_split": "eval",
        "text_template": "Tone of: {phrase}\n{tone}",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "eval_generate_limit": 4,
        "eval_max_new_tokens": 4,
        "progress": False,
        "output_path": str(tmp_path / "run"),
    }


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run the installed `slmops` entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "slmops.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_runs(tiny_model_dir: Path, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> train run folder: `tone` (q,v r=4 alpha 8), `extract` (all-linear r=8 alpha 16, chat template)."""
    from slmops_train.config import build_config
    from slmops_train.recipe import train

    root = tmp_path_factory.mktemp("runs")
    common = {
        "model_name_or_path": str(tiny_model_dir), "max_steps": 6, "per_device_train_batch_size": 4,
        "logging_steps": 1, "learning_rate": 1e-2, "eval_generate_limit": 4, "eval_max_new_tokens": 4,
        "progress": False, "report_to": [], "eval_split": "eval",
    }
    train(build_config({
        **common, "data_files": [f"train={tiny_data['tone_train']}", f"eval={tiny_data['tone_eval']}"],
        "text_template": "Tone of: {phrase}\n{tone}", "lora_r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "output_path": str(root / "tone"),
    }))
    train(build_config({
        **common, "data_files": [f"train={tiny_data['extract_train']}", f"eval={tiny_data['extract_eval']}"],
        "text_template": "Extract: {request}\n{json}", "use_chat_template": True, "lora_r": 8, "lora_alpha": 16,
        "target_modules": ["all-linear"], "output_path": str(root / "extract"),
    }))
    return {"tone": root / "tone", "extract": root / "extract"}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir: Path, tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 cpu bundle with adapters `tone` (q,v r=4) and `extract` (all-linear r=8); no validation (fast)."""
    from rich.console import Console
    from slmops_build.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("serve-bundle") / "cpu"
    config = BuildConfig(target="cpu", precision="fp32", model_name_or_path=str(tiny_model_dir),
                         adapters={"tone": str(tiny_runs["tone"]), "extract": str(tiny_runs["extract"])},
                         output_path=str(out), validate_bundle=False)
    return build_bundle(config, console=Console(stderr=True, quiet=True))
