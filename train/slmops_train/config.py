"""TrainConfig: the one typed config that the CLI, YAML files and tests all build.

Option names follow Olive's ``olive finetune`` so seed commands work with ``olive`` replaced by
``slmops``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.configfile import load_yaml
from slmops.errors import SlmopsUsageError, usage_error_from_validation

# `train`, `train[:4096]`, `train[4096:4224]`, `train[:90%]`, `validation`
# `--data_name json --data_files x.json` (olive's form) names the files' format, not a dataset
DATA_BUILDERS: dict[str, tuple[str, ...]] = {"json": (".json", ".jsonl"), "csv": (".csv",), "parquet": (".parquet", ".pq")}


def _builder_for(suffix: str) -> str:
    return next((name for name, suffixes in DATA_BUILDERS.items() if suffix in suffixes), "json")
SPLIT_PATTERN = re.compile(r"^[A-Za-z_][\w.-]*(\[(-?\d+%?)?:(-?\d+%?)?\])?$")


class TrainConfig(BaseModel):
    """Everything one adapter run needs. Field names are the CLI option names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = Field(None, description="run name; default: derived from the data")
    # model and adapter
    model_name_or_path: str = Field("default", description="local HF folder, hub id, or 'default'")
    method: Literal["lora", "qlora"] = "lora"
    lora_r: int = Field(8, ge=1, description="higher increases capacity and memory")
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="module names or 'all-linear'; default: every linear projection of the decoder layers, under the family's names")
    modules_to_save: list[str] | None = Field(None, description="refused: a bundle's adapters carry LoRA A/B pairs only")
    use_rslora: bool = False
    trust_remote_code: bool = False
    # data
    data_name: str | None = None
    data_files: list[str] | None = None
    train_split: str = "train"
    eval_split: str | None = Field("auto", description="'auto': 'validation'/'test' split or a 10% hold-out; 'none' disables")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    test_split: str | None = Field(None, description="rows scored once after training and checkpoint selection, never used "
                                   "for either (e.g. 'test' with --data_files test=FILE); run.json reports them apart")
    text_field: str | None = None
    text_template: str | None = None
    use_chat_template: bool = False
    input_field: str | None = None
    output_field: str | None = None
    system_prompt: str | None = None
    train_on_full_text: bool = Field(False, description="loss on every token instead of the answer only")
    max_seq_len: int = Field(512, ge=8)
    max_samples: int | None = Field(None, ge=1)
    packing: bool = False
    # optimisation
    max_steps: int = -1
    num_train_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. adamw_torch, adafactor, sgd")
    fp16: bool = Field(False, description="fp16 mixed precision (CUDA only)")
    bf16: bool = Field(False, description="bf16 mixed precision")
    dataloader_num_workers: int = Field(0, ge=0, description="data loader worker processes")
    loss_fn: str | None = Field(None, description="import path 'pkg.module:Callable' of a custom loss")
    seed: int = 42
    # logging, evaluation, checkpoints
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default: once at the end")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps; default: eval_steps")
    save_total_limit: int = Field(2, ge=1)
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"],
                                 description="'tensorboard' or 'none' (slmops logs to TensorBoard only)")
    logging_dir: str | None = Field(None, description="TensorBoard log folder; default <output_path>/tensorboard")
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_threshold: float = Field(0.0, ge=0)
    metric_for_best_model: str = Field("eval_loss", description="eval_loss, eval_accuracy, eval_macro_f1, eval_rouge_l, eval_bleu")
    task_type: Literal["auto", "classification", "generation"] = "auto"
    eval_generate_limit: int = Field(64, ge=0, description="eval rows to generate answers for (accuracy/ROUGE); 0 disables")
    eval_max_new_tokens: int | None = Field(None, ge=1)
    # output
    output_path: str | None = Field(None, description="run folder; default runs/<name>")
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    @field_validator("train_split", "eval_split", "test_split")
    @classmethod
    def _check_split(cls, value: str | None, info: Any) -> str | None:
        if value is None or value in ("auto", "none"):
            return value
        if not SPLIT_PATTERN.match(value.replace(" ", "")):
            raise ValueError(
                f"'{value}' is not a split; use a name with an optional slice like 'train', "
                "'train[:4096]', 'train[4096:4224]' or 'train[:90%]'"
            )
        return value.replace(" ", "")

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_report_to(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            names = [str(p).strip() for v in value for p in str(v).split(",") if str(p).strip()]
            names = ["tensorboard" if n == "all" else n for n in names if n != "none"]
            other = [n for n in names if n != "tensorboard"]
            if other:
                raise ValueError(f"--report_to: {other} not supported: slmops logs to TensorBoard only "
                                 "(<output_path>/tensorboard, or --logging_dir); use --report_to tensorboard or none")
            return sorted(set(names))
        return value

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _refuse_modules_to_save(cls, value: Any) -> Any:
        if value:
            raise ValueError(f"--modules_to_save: {value} refused: a bundle's .onnx_adapter files carry only LoRA A/B "
                             "pairs, so fully trained copies of these modules could not be served; leave it out "
                             "(raise --lora_r, or add the modules to --target_modules if they are linear)")
        return None

    @model_validator(mode="before")
    @classmethod
    def _builder_data_name(cls, values: Any) -> Any:
        # olive's `--data_name json --data_files FILE`: the name is the datasets builder of the files
        if isinstance(values, dict) and values.get("data_files") and values.get("data_name") in DATA_BUILDERS:
            builder = values["data_name"]
            files = values["data_files"] if isinstance(values["data_files"], (list, tuple)) else [values["data_files"]]
            for item in (p.strip() for v in files for p in str(v).split(",") if p.strip()):
                suffix = Path(item.rpartition("=")[2]).suffix.lower()
                if DATA_BUILDERS[builder] and suffix not in DATA_BUILDERS[builder]:
                    raise ValueError(f"--data_name: '{builder}' does not match the file '{item}'; "
                                     f"use --data_name {_builder_for(suffix)} or leave --data_name out")
            values = {k: v for k, v in values.items() if k != "data_name"}
        return values

    @field_validator("target_modules", "data_files", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            out = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
            return out or None
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> TrainConfig:
        if not self.data_name and not self.data_files:
            raise ValueError("no data: set data_files (json, jsonl, csv, parquet) or data_name")
        if self.data_name and self.data_files:
            raise ValueError("set either data_name or data_files, not both")
        return self

    # ---- derived values -------------------------------------------------------------------
    def run_name(self) -> str:
        if self.name:
            return self.name
        if self.output_path:
            return Path(self.output_path).name
        source = self.data_files[0].split("=", 1)[-1] if self.data_files else str(self.data_name)
        stem = Path(source.rstrip("/")).stem or "adapter"
        return re.sub(r"[^\w.-]+", "-", stem)

    def run_dir(self) -> Path:
        return Path(self.output_path) if self.output_path else Path("runs") / self.run_name()


def build_config(values: dict[str, Any], source: str = "") -> TrainConfig:
    """Validate ``values`` into a TrainConfig; errors name the option (exit 2 at the CLI)."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise usage_error_from_validation(exc, "train", source, last_part=True, no_field="--data_files/--data_name") from exc


def configs_from_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> list[TrainConfig]:
    """One TrainConfig per adapter in a YAML file.

    A file holds options at the top level, and optionally ``adapters:``, a mapping of adapter
    name -> options that override the top level (the seed's multi-adapter training in one file).
    ``overrides`` (from the CLI) win over both. Relative data paths resolve against the file.
    """
    data = load_yaml(path)
    adapters = data.pop("adapters", None)
    base_dir = Path(path).resolve().parent
    entries: list[tuple[str | None, dict[str, Any]]]
    if adapters is None:
        entries = [(data.get("name"), dict(data))]
    elif isinstance(adapters, dict) and adapters:
        entries = [(name, {**data, **(opts or {}), "name": name}) for name, opts in adapters.items()]
    else:
        raise SlmopsUsageError("--config", f"'adapters' in {path} must be a non-empty mapping name -> options")
    configs = []
    for _name, values in entries:
        values = {**values, **(overrides or {})}
        if values.get("data_files"):
            values["data_files"] = _resolve_data_files(values["data_files"], base_dir)
        configs.append(build_config(values, source=str(path)))
    if len(configs) > 1 and overrides and "output_path" in overrides:
        # One --output_path for several adapters: treat it as the parent of the run folders.
        for cfg in configs:
            cfg.output_path = str(Path(str(overrides["output_path"])) / cfg.run_name())
    return configs


def _resolve_data_files(files: Any, base_dir: Path) -> list[str]:
    items = files if isinstance(files, list) else [files]
    out = []
    for item in items:
        for part in str(item).split(","):
            split, sep, file = part.strip().rpartition("=")
            path = Path(file)
            if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
                file = str(base_dir / path)
            out.append(f"{split}{sep}{file}")
    return out
