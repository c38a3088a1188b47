"""Build-stage fixtures: two tiny adapters trained once, and LoRA / plain exports of the tiny model.

The model builder runs in-process here (``in_process=True``): a subprocess would re-import torch
and transformers (~10 s) per export. The CLI tests use the default subprocess path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops.bundle import LoraTemplate

PROMPTS = ["Tone of: Today my brother got engaged overnight!\n", "Tone of: I lost my keys again\n"]


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
