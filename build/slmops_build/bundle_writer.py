"""Write bundle.json: checksums of every file, the adapter ABI, provenance and validation."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmops.bundle import BUNDLE_JSON, AdapterInfo, BaseModelInfo, BundleManifest, LoraTemplate, TargetInfo
from slmops.contract import package_versions
from slmops.fsutil import portable_path, sha256_file
from slmops.models import PREPARED_MARKER, model_weights_sha256
from slmops.targets import Target

PRODUCER_PACKAGES = ("slmops", "onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir", "transformers", "peft", "torch")


def producer_versions() -> dict[str, str]:
    return package_versions(PRODUCER_PACKAGES)


def base_model_info(model_dir: str | Path, name_or_path: str) -> BaseModelInfo:
    """Name, source and weights sha256 of the base model (the prepared default records its GGUF source)."""
    model_dir = Path(model_dir)
    marker = model_dir / PREPARED_MARKER
    if marker.is_file():
        data = json.loads(marker.read_text())  # weights re-hashed: a tampered cache does not pass as the marker's
        return BaseModelInfo(name=str(data["name"]), source=str(data["source"]), sha256=model_weights_sha256(model_dir))
    name = model_dir.name
    config_path = model_dir / "config.json"
    if config_path.is_file():
        name = str(json.loads(config_path.read_text()).get("_name_or_path") or name)
    source = portable_path(name_or_path if name_or_path not in (None, "", "default") else model_dir)
    return BaseModelInfo(name=name or model_dir.name, source=str(source), sha256=model_weights_sha256(model_dir))


def file_checksums(bundle_dir: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in the bundle but bundle.json."""
    out = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel != BUNDLE_JSON:
            out[rel] = sha256_file(path)
    return out


def write_manifest(bundle_dir: Path, target: Target, template: LoraTemplate, base: BaseModelInfo,
                   adapters: dict[str, AdapterInfo], validation: dict[str, Any], build_key: str,
                   build: dict[str, Any], merged_adapter: str | None = None) -> BundleManifest:
    manifest = BundleManifest(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target=TargetInfo(name=target.name, execution_provider=target.execution_provider, precision=target.precision,
                          adapter_dtype=template.dtype, arch=target.arch, provider=target.provider),
        base_model=base,
        files=file_checksums(bundle_dir),
        lora_template=template,
        adapters=adapters,
        merged_adapter=merged_adapter,
        producer=producer_versions(),
        validation=validation,
        build_key=build_key,
        build=build,
    )
    manifest.write(bundle_dir)
    return manifest
