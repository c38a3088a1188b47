"""Build-stage fixtures: LoRA / plain exports of the tiny model (``tiny_runs`` lives in tests/conftest.py).

The model builder runs in-process here (``in_process=True``): a subprocess would re-import torch
and transformers (~10 s) per export. The CLI tests use the default subprocess path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops.bundle import LoraTemplate
from tests.conftest import write_jsonl

PROMPTS = ["Tone of: Today my brother got engaged overnight!\n", "Tone of: I lost my keys again\n"]


@dataclass
class Export:
    model_dir: Path
    template: LoraTemplate
    work: Path


@pytest.fixture(scope="session")
def lora_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Export:
    """fp32 export with LoRA inputs on every linear module; ``work`` keeps the builder's raw/ export."""
    from slmops_build.export import export_base_model

    from slmops.targets import get_target

    root = tmp_path_factory.mktemp("lora-export")
    template = export_base_model(tiny_model_dir, root / "model", get_target("cpu", precision="fp32"), None,
                                 work_dir=root / "work", in_process=True)
    return Export(root / "model", template, root / "work")


@pytest.fixture(scope="session")
def plain_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 export without LoRA (packed QKV, the builder's plain graph)."""
    from slmops_build.export import export_base_model

    from slmops.targets import get_target

    root = tmp_path_factory.mktemp("plain-export")
    export_base_model(tiny_model_dir, root / "model", get_target("cpu", precision="fp32"), None, with_lora=False,
                      work_dir=root / "work", in_process=True)
    return root / "model"


TEMPLATE = "Tone of: {phrase}\n{tone}"


@pytest.fixture(scope="session")
def joy_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adapter that has learned one thing for sure: every answer is "joy".

    The random tiny model cannot learn the real five labels in a test's budget; a constant answer it
    learns fully, so the PyTorch side scores 10/10 and a broken conversion has something to lose.
    """
    from slmops_train.config import build_config
    from slmops_train.recipe import train

    root = tmp_path_factory.mktemp("joy")
    rows = [json.loads(line) for line in (Path(__file__).parents[2] / "examples/tone/train.jsonl").read_text().splitlines()]
    train_file = write_jsonl(root / "train.jsonl", [{"phrase": r["phrase"], "tone": "joy"} for r in rows[:40]])
    eval_file = write_jsonl(root / "eval.jsonl", [{"phrase": r["phrase"], "tone": "joy"} for r in rows[40:50]])
    test_file = write_jsonl(root / "test.jsonl", [{"phrase": r["phrase"], "tone": "joy"} for r in rows[50:60]])
    result = train(build_config({
        "model_name_or_path": str(tiny_model_dir),
        "data_files": [f"train={train_file}", f"eval={eval_file}", f"test={test_file}"],
        "eval_split": "eval", "test_split": "test", "text_template": TEMPLATE, "task_type": "classification", "max_steps": 30,
        "per_device_train_batch_size": 8, "learning_rate": 2e-2, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["all-linear"], "eval_generate_limit": 10, "eval_max_new_tokens": 4,
        "progress": False, "report_to": [], "output_path": str(root / "run"),
    }))
    assert result.metrics["eval_accuracy"] == 1.0, result.metrics  # the premise of the tests below
    return result.run_dir
