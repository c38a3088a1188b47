"""Olive's finetune output layout: ``<out>/adapter`` (PEFT) beside ``<out>/model``.

``<out>/model`` is a symbolic link to the base model folder the adapter was trained on (not a
copy), so olive's next step, ``auto-opt --model_name_or_path <out>/model --adapter_path
<out>/adapter``, works unchanged. Where links are not possible it is a folder holding only
``slmops_model_ref.json``, which ``slmops.models.resolve_model_path`` follows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slmops.models import MODEL_REF

MODEL_LINK = "model"


def link_base_model(run_dir: Path, model_path: str | Path) -> Path:
    """Create ``run_dir/model`` pointing at ``model_path``; return it."""
    link = Path(run_dir) / MODEL_LINK
    target = Path(model_path).resolve()
    if link.is_symlink() or link.is_file():
        link.unlink()
    try:
        os.symlink(target, link, target_is_directory=True)
    except OSError:  # e.g. a filesystem without symlinks: a small reference instead
        link.mkdir(exist_ok=True)
        (link / MODEL_REF).write_text(json.dumps({"base_model": str(target)}, indent=2))
    return link
