"""bundle.json: the contract between the build stage (writer) and the serve stage (reader).

Light on purpose (pydantic only): the serve image reads it without torch or onnx.
Not named manifest.json: onnxruntime-genai >= 0.16 treats a manifest.json as its own package format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmops.contract import adapter_name_problem
from slmops.fsutil import sha256_file

BUNDLE_JSON = "bundle.json"
# Major version of this file's schema: a reader refuses a different major.
SCHEMA_VERSION = 1
# Version of the LoRA input layout (names, shapes, packing) that adapters must match. A change of
# layout bumps it, and old bundles/adapters are refused by name.
#   1: one LoRA pair per PEFT module (q/k/v/o/gate/up/down), unpacked base projections.
#   2: one LoRA pair per *packed* base projection (qkv_proj, o_proj, gate_up_proj, down_proj):
#      A is the members' A concatenated along the rank, B block-diagonal (see ``projections``).
#   3: ABI 2's adapter files unchanged, plus one graph input ``lora_row_mask.{projection}``
#      [rows, 1, r] per projection kind, so one step can serve rows with different adapters.
ABI_VERSION = 3
ABI_CHANGES = {
    1: "adapter ABI 1 had one LoRA input pair per q/k/v/gate/up module; ABI 2 packs them per fused projection",
    2: "adapter ABI 2 graphs have no per-row LoRA masks, so the batching server cannot mix adapters in one step "
       "(ABI 2 .onnx_adapter files are still valid: rebuild only the bundle)",
}


class BundleError(Exception):
    """A bundle or adapter that does not match its contract (checksum, ABI, schema)."""


class TargetInfo(BaseModel):
    name: str
    execution_provider: str
    precision: str
    adapter_dtype: str
    # Docker platform architecture (amd64, arm64) the bundle's settings are for; serve and deploy
    # refuse another (slmops.platforms). None: written before slmops recorded it (the target's).
    arch: str | None = None
    provider: str | None = None  # onnxruntime provider name, e.g. CPUExecutionProvider


class BaseModelInfo(BaseModel):
    name: str
    source: str
    sha256: str


class LoraInput(BaseModel):
    """One LoRA graph input: ``{prefix}.lora_A.MatMul.weight`` [in, r] or ``...lora_B...`` [r, out]."""

    name: str
    shape: list[int | str]


class PackedMember(BaseModel):
    """A PEFT module inside a packed projection: its output columns are ``[offset, offset + size)``."""

    module: str
    offset: int
    size: int


class LoraTemplate(BaseModel):
    """The adapter ABI: which modules take LoRA inputs, their names, shapes and dtype.

    ``projections`` maps each base projection that has a LoRA pair (``qkv_proj``, ``o_proj``,
    ``gate_up_proj``, ``down_proj``) to the PEFT modules packed into it, in output order.
    """

    abi_version: int = ABI_VERSION
    modules: list[str]  # e.g. ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    num_layers: int
    dtype: str
    inputs: list[LoraInput]
    projections: dict[str, list[PackedMember]] = Field(default_factory=dict)
    # projection kind -> its row-mask graph input (ABI 3); empty for a bundle without LoRA inputs
    row_masks: dict[str, str] = Field(default_factory=dict)

    def projection_of(self, module: str) -> tuple[str, PackedMember] | None:
        """``"v_proj"`` -> ``("qkv_proj", PackedMember(v_proj, 768, 192))``."""
        for projection, members in self.projections.items():
            for member in members:
                if member.module == module:
                    return projection, member
        return None

    def input_names(self) -> set[str]:
        return {i.name for i in self.inputs}


class AdapterInfo(BaseModel):
    file: str
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str
    source_run: str | None = None
    eval_metrics: dict[str, Any] = Field(default_factory=dict)


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    created_at: str
    target: TargetInfo
    base_model: BaseModelInfo
    model_dir: str = "model"
    files: dict[str, str]  # relative path -> sha256, every file of the bundle but bundle.json
    lora_template: LoraTemplate
    adapters: dict[str, AdapterInfo] = Field(default_factory=dict)
    merged_adapter: str | None = None
    producer: dict[str, str] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    # Hash of the build config and every input's checksum: a rebuild with the same key is skipped.
    build_key: str | None = None
    # How it was built: the resolved build options and timings (informational).
    build: dict[str, Any] = Field(default_factory=dict)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, AdapterInfo]) -> dict[str, AdapterInfo]:
        for name in adapters:  # the name every stage uses (slmops.contract), so a bundle never holds one serve refuses
            problem = adapter_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
        return adapters

    def write(self, bundle_dir: Path) -> None:
        (Path(bundle_dir) / BUNDLE_JSON).write_text(json.dumps(self.model_dump(), indent=2) + "\n")


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / BUNDLE_JSON
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {BUNDLE_JSON}; build one with `slmops build`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc}); rebuild the bundle with `slmops build`") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} holds a JSON {type(data).__name__}, not a bundle manifest (an object); "
                          "rebuild the bundle with `slmops build`")
    major = data.get("schema_version")
    if major != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {major} is not supported (this slmops reads {SCHEMA_VERSION}); rebuild the bundle")
    abi = data.get("lora_template", {}).get("abi_version")
    if abi != ABI_VERSION:
        why = f" ({ABI_CHANGES[abi]})" if abi in ABI_CHANGES else ""
        raise BundleError(f"{path}: adapter ABI version {abi} is not supported (this slmops uses {ABI_VERSION}){why}; "
                          "rebuild the bundle with `slmops build`")
    try:
        return BundleManifest(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise BundleError(f"{path}: {where}: {message} ({exc.error_count()} problem(s)); rebuild the bundle "
                          "with `slmops build`") from exc


def verify_files(bundle_dir: str | Path, manifest: BundleManifest) -> list[str]:
    """Re-hash every file listed in the manifest; return the problems (empty = all good)."""
    problems = []
    for rel, expected in manifest.files.items():
        path = Path(bundle_dir) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
