"""Build-stage fixtures: LoRA / plain exports of the tiny model (``tiny_runs`` lives in tests/conftest.py).

The model builder runs in-process here (``in_process=True``): a subprocess would re-import torch
and transformers (~10 s) per export. The CLI tests use the default subprocess path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops.bundle import LoraTemplate

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
