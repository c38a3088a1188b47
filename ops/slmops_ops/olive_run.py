"""``slmops run --config FILE``: the part of an olive workflow config that maps onto slmops' stages.

Both forms users have are read: the SLMOps guide's (``model: {type: PyTorchModel, config:
{model_path}}``, passes with a ``config:`` block) and current olive's (``input_model: {type:
HfModel, model_path}``, pass fields inline). What maps:

* ``data_configs`` (HuggingfaceContainer: ``load_dataset_config`` data_name/data_files/split,
  ``pre_process_data_config`` text_template/text_cols/max_seq_len/max_samples) -> train data;
* a ``LoRA`` / ``QLoRA`` pass (r, lora_alpha, lora_dropout, target_modules, modules_to_save,
  training_args, train/eval_data_config) -> ``slmops train`` into ``<output_dir>``;
* ``ModelBuilder`` / ``OnnxConversion``, ``ExtractAdapters``, and quantization passes
  (``OnnxMatMul4Quantizer``, ``OnnxBlockWiseRtnQuantization`` -> int4, ``OnnxDynamicQuantization``
  -> int8, ``OnnxFloatToFloat16`` -> fp16) -> ``slmops build`` into ``<output_dir>/bundle`` (or
  ``<output_dir>`` without a training pass);
* ``systems`` accelerators (device, execution_providers) -> the build target; ``output_dir``;
  ``log_severity_level``.

Anything else (another pass type, an unknown field) is refused with its name and path in the file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from slmops.clickutil import apply_log_level
from slmops.errors import SlmopsUsageError

TRAIN_PASSES = {"lora": "lora", "qlora": "qlora"}
CONVERT_PASSES = {"modelbuilder", "onnxconversion"}
QUANT_PASSES = {"onnxmatmul4quantizer": "int4", "onnxblockwisertnquantization": "int4",
                "onnxdynamicquantization": "int8", "onnxfloattofloat16": "fp16"}
EXTRACT_PASSES = {"extractadapters"}
SUPPORTED_PASSES = ["LoRA", "QLoRA", "ModelBuilder", "OnnxConversion", "ExtractAdapters", "OnnxMatMul4Quantizer",
                    "OnnxBlockWiseRtnQuantization", "OnnxDynamicQuantization", "OnnxFloatToFloat16"]
MODEL_TYPES = {"pytorchmodel", "hfmodel"}
TASKS = (None, "text-generation", "text-generation-with-past")
# LoRA pass fields -> TrainConfig fields
LORA_FIELDS = {"r": "lora_r", "lora_r": "lora_r", "lora_alpha": "lora_alpha", "alpha": "lora_alpha",
               "lora_dropout": "lora_dropout", "target_modules": "target_modules",
               "modules_to_save": "modules_to_save", "use_rslora": "use_rslora"}
STAGE_PACKAGES = {"train": ["torch", "transformers", "peft", "datasets", "accelerate"],
                  "build": ["onnx", "onnxruntime", "onnxruntime_genai"]}


@dataclass
class Plan:
    """What ``slmops run`` will do: train values, build values, where."""

    output_dir: Path
    train: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    log_level: int | None = None
    notes: list[str] = field(default_factory=list)


class _Reader:
    """Pops fields from a config mapping; leftovers are refused with their path in the file."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, dict):
            raise SlmopsUsageError("--config", f"{where or 'the file'} must be a mapping (in {source})")
        self.data = dict(data)
        self.where = where
        self.source = source

    def pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.data.pop(key, None) or {}, f"{self.where}.{key}".lstrip("."), self.source)

    def done(self, hint: str = "") -> None:
        if self.data:
            names = ", ".join(f"{self.where}.{k}".lstrip(".") for k in self.data)
            raise SlmopsUsageError("--config", f"{names} not supported by slmops run (in {self.source})"
                                   f"{'; ' + hint if hint else ''}")


def _pass_fields(spec: _Reader) -> _Reader:
    """A pass's fields: the guide's ``config:`` block, or current olive's inline fields."""
    inner = spec.pop("config")
    if inner is not None:
        nested = _Reader(inner, f"{spec.where}.config", spec.source)
        spec.done()
        return nested
    return spec


def _resolve_file(value: str, base: Path) -> str:
    path = Path(value)
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        return str(base / path)
    return value


def _data_values(cfg: _Reader, base: Path) -> dict[str, Any]:
    """One data config -> TrainConfig data fields (``split`` kept under the key ``split``)."""
    kind = str(cfg.pop("type", "HuggingfaceContainer"))
    if kind.lower() != "huggingfacecontainer":
        raise SlmopsUsageError("--config", f"{cfg.where}.type '{kind}' is not supported; use HuggingfaceContainer "
                               f"(in {cfg.source})")
    out: dict[str, Any] = {}
    load = cfg.sub("load_dataset_config")
    params = cfg.sub("params_config")  # older olive: every field flat here
    pre = cfg.sub("pre_process_data_config")
    loader = cfg.sub("dataloader_config")
    for reader in (load, params):
        if (name := reader.pop("data_name")) is not None:
            out["data_name"] = name
        if (files := reader.pop("data_files")) is not None:
            items = files if isinstance(files, list) else [files]
            out["data_files"] = [_resolve_file(str(f), base) for f in items]
        if (split := reader.pop("split")) is not None:
            out["split"] = str(split)
    for reader in (pre, params):
        if (template := reader.pop("text_template")) is not None:
            out["text_template"] = template
        if (cols := reader.pop("text_cols", reader.pop("text_field"))) is not None:
            cols = cols if isinstance(cols, list) else [cols]
            if len(cols) != 1:
                raise SlmopsUsageError("--config", f"{reader.where}.text_cols {cols}: one text column only; for several "
                                       f"use text_template '{{a}} {{b}}' (in {cfg.source})")
            out["text_field"] = cols[0]
        for key in ("max_seq_len", "max_samples"):
            if (value := reader.pop(key)) is not None:
                out[key] = value
        chat = reader.pop("chat_template", reader.pop("use_chat_template"))
        if chat is not None:
            out["use_chat_template"] = bool(chat)
    if (batch := loader.pop("batch_size")) is not None:
        out["per_device_train_batch_size"] = batch
    for reader in (load, params, pre, loader):
        reader.done()
    cfg.pop("name")
    cfg.done()
    return out


def plan_from_config(data: dict[str, Any], source: str, base: Path) -> Plan:
    """Translate an olive config mapping into a Plan; refuse what does not map."""
    top = _Reader(data, "", source)
    engine = top.sub("engine")
    output_dir = top.pop("output_dir", engine.pop("output_dir")) or f"runs/{Path(source).stem}"
    log_level = top.pop("log_severity_level", engine.pop("log_severity_level"))
    engine.done("engine takes output_dir and log_severity_level")
    plan = Plan(output_dir=Path(str(output_dir)), log_level=None if log_level is None else int(log_level))

    # model
    model_spec = top.pop("input_model")
    legacy = top.pop("model")
    if model_spec is None and legacy is None:
        raise SlmopsUsageError("--config", f"no model: add input_model: {{type: HfModel, model_path: ...}} (in {source})")
    model = _Reader(model_spec if model_spec is not None else legacy, "input_model" if model_spec is not None else "model",
                    source)
    mtype = str(model.pop("type", "HfModel"))
    if mtype.lower() not in MODEL_TYPES:
        raise SlmopsUsageError("--config", f"{model.where}.type '{mtype}' is not supported; use HfModel or PyTorchModel "
                               f"(a Hugging Face causal LM folder or hub id) (in {source})")
    mfields = _pass_fields(model)
    model_path = mfields.pop("model_path")
    task = mfields.pop("task")
    adapter_path = mfields.pop("adapter_path")
    load_kwargs = mfields.sub("load_kwargs")
    legacy_kwargs = mfields.sub("model_loading_args")
    trust = bool(load_kwargs.pop("trust_remote_code", legacy_kwargs.pop("trust_remote_code", False)))
    load_kwargs.pop("attn_implementation")  # olive's default "eager"; transformers picks per model
    load_kwargs.done()
    legacy_kwargs.done()
    mfields.done()
    if task not in TASKS:
        raise SlmopsUsageError("--config", f"{model.where} task '{task}' is not supported: text-generation only (in {source})")
    if not model_path:
        raise SlmopsUsageError("--config", f"{model.where}: model_path is missing (in {source})")
    model_path = _resolve_file(str(model_path), base)

    # data
    data_configs = top.pop("data_configs") or []
    if isinstance(data_configs, dict):  # older olive: name -> config
        data_configs = [{"name": k, **(v or {})} for k, v in data_configs.items()]
    datasets: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(data_configs):
        name = str((entry or {}).get("name", f"data_{i}"))
        datasets[name] = _data_values(_Reader(entry, f"data_configs[{i}]", source), base)

    # training options given outside the pass (the guide's `training_config:` snippet)
    loose_training = top.pop("training_config") or top.pop("training_args") or {}

    # systems -> target
    systems = top.pop("systems") or {}
    target_name = top.pop("target")
    top.pop("host")
    device = provider = None
    if systems:
        sys_name = target_name if target_name in systems else next(iter(systems))
        system = _Reader(systems[sys_name], f"systems.{sys_name}", source)
        stype = str(system.pop("type", "LocalSystem"))
        if stype.lower() != "localsystem":
            raise SlmopsUsageError("--config", f"systems.{sys_name}.type '{stype}': slmops runs locally (LocalSystem) (in {source})")
        fields_ = _pass_fields(system)
        accelerators = fields_.pop("accelerators") or []
        fields_.done()
        if accelerators:
            acc = _Reader(accelerators[0], f"systems.{sys_name}.accelerators[0]", source)
            device = acc.pop("device")
            eps = acc.pop("execution_providers") or []
            provider = eps[0] if eps else None
            acc.done()
        for k in [k for k in systems if k != sys_name]:
            plan.notes.append(f"systems.{k} is not the target system; not used")

    # passes
    passes = top.pop("passes") or {}
    if not isinstance(passes, dict):
        raise SlmopsUsageError("--config", f"passes must be a mapping name -> pass (in {source})")
    train_values: dict[str, Any] | None = None
    build_values: dict[str, Any] = {}
    convert = False
    for pname, raw in passes.items():
        runs = raw if isinstance(raw, list) else [raw]  # auto-opt style: name -> [pass configs]
        for spec in runs:
            reader = _Reader(spec, f"passes.{pname}", source)
            ptype = str(reader.pop("type", ""))
            key = ptype.lower()
            pf = _pass_fields(reader)
            if key in TRAIN_PASSES:
                if train_values is not None:
                    raise SlmopsUsageError("--config", f"passes.{pname}: one LoRA/QLoRA pass per config (in {source})")
                train_values = _train_values(pf, TRAIN_PASSES[key], datasets, loose_training, source)
            elif key in CONVERT_PASSES:
                convert = True
                precision = pf.pop("precision")
                if precision is not None:
                    build_values["precision"] = _precision(str(precision), f"{pf.where}.precision", source)
                if pf.pop("metadata_only", False):
                    raise SlmopsUsageError("--config", f"{pf.where}.metadata_only: slmops always exports the model "
                                           f"itself; remove it (in {source})")
                extra = pf.pop("extra_options")
                if extra:
                    build_values.setdefault("extra_options", {}).update({str(k): str(v) for k, v in extra.items()})
                pf.pop("save_metadata_for_token_generation")  # genai_config.json is always written
                pf.done("ModelBuilder takes precision and extra_options")
            elif key in QUANT_PASSES:
                build_values["precision"] = QUANT_PASSES[key]
                for src_key, option in (("block_size", "block_size"), ("accuracy_level", "accuracy_level")):
                    if (value := pf.pop(src_key)) is not None:
                        build_values.setdefault("extra_options", {})[option] = str(value)
                pf.done("quantization passes take block_size and accuracy_level")
            elif key in EXTRACT_PASSES:
                fmt = pf.pop("save_format")
                if fmt not in (None, "onnx_adapter"):
                    raise SlmopsUsageError("--config", f"{pf.where}.save_format '{fmt}': slmops writes .onnx_adapter "
                                           f"files only (in {source})")
                if pf.pop("make_inputs", True) is False:
                    raise SlmopsUsageError("--config", f"{pf.where}.make_inputs false: slmops bundles take adapters "
                                           f"as inputs; use `slmops build --merge` to bake one in (in {source})")
                pf.pop("adapter_type")
                pf.done()
            else:
                raise SlmopsUsageError("--config", f"passes.{pname}: pass type '{ptype}' is not supported by slmops run; "
                                       f"supported: {', '.join(SUPPORTED_PASSES)} (in {source})")

    for key in ("workflow_id", "description", "clean_cache", "no_artifacts", "evaluate_input_model"):
        top.pop(key)  # bookkeeping flags of olive's engine, with no slmops counterpart to set
    top.done("slmops run takes model/input_model, data_configs, passes, systems, output_dir, log_severity_level")

    if train_values is not None:
        train_values.update(model_name_or_path=model_path, trust_remote_code=trust, output_path=str(plan.output_dir))
        if adapter_path:
            raise SlmopsUsageError("--config", f"{model.where}.adapter_path and a LoRA pass: pass one (in {source})")
        plan.train = train_values
    elif datasets:
        plan.notes.append("data_configs are only read by a LoRA/QLoRA pass; none here")
    if convert or build_values or (train_values is None and adapter_path):
        build_values.update(model_name_or_path=model_path, device=device, provider=provider)
        if plan.train is not None:
            build_values["adapters"] = {plan.output_dir.name: str(plan.output_dir)}
            build_values["output_path"] = str(plan.output_dir / "bundle")
        else:
            if adapter_path:
                build_values["adapters"] = [_resolve_file(str(adapter_path), base)]
            build_values["output_path"] = str(plan.output_dir)
        plan.build = {k: v for k, v in build_values.items() if v is not None}
    if plan.train is None and plan.build is None:
        raise SlmopsUsageError("--config", f"no pass that slmops runs; supported: {', '.join(SUPPORTED_PASSES)} (in {source})")
    return plan


def _precision(value: str, where: str, source: str) -> str:
    mapped = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "int4": "int4", "int8": "int8"}
    if value.lower() not in mapped:
        raise SlmopsUsageError("--config", f"{where} '{value}' is not one of fp32, fp16, int8, int4 (in {source})")
    return mapped[value.lower()]


def _train_values(pf: _Reader, method: str, datasets: dict[str, dict[str, Any]], loose: dict[str, Any],
                  source: str) -> dict[str, Any]:
    from slmops_train.config import TrainConfig

    values: dict[str, Any] = {"method": method}
    for src_key, dst in LORA_FIELDS.items():
        if (value := pf.pop(src_key)) is not None:
            values[dst] = value
    train_name = pf.pop("train_data_config")
    eval_name = pf.pop("eval_data_config")
    dtype = pf.pop("torch_dtype")
    if dtype not in (None, "float32"):
        raise SlmopsUsageError("--config", f"{pf.where}.torch_dtype {dtype}: slmops trains on float32 weights; use "
                               f"training_args bf16: true (or fp16 on a GPU) for mixed precision (in {source})")
    training = {**(loose or {}), **(pf.pop("training_args") or {}), **(pf.pop("training_config") or {})}
    # fields of TrainConfig given directly in the pass (the guide puts weight_decay there)
    for key in list(pf.data):
        if key in TrainConfig.model_fields:
            training[key] = pf.pop(key)
    pf.done("LoRA passes take r, lora_alpha, lora_dropout, target_modules, modules_to_save, training_args and "
            "train/eval_data_config")
    unknown = [k for k in training if k not in TrainConfig.model_fields]
    if unknown:
        raise SlmopsUsageError("--config", f"{pf.where}.training_args {unknown} not supported; `slmops train --help` "
                               f"lists the training options slmops honours (in {source})")
    values.update(training)
    if not datasets:
        raise SlmopsUsageError("--config", f"{pf.where}: no data_configs to train on (in {source})")
    name = train_name or next(iter(datasets))
    if name not in datasets:
        raise SlmopsUsageError("--config", f"{pf.where}.train_data_config '{name}' is not one of {sorted(datasets)} (in {source})")
    train_data = dict(datasets[name])
    values["train_split"] = train_data.pop("split", "train")
    values.update(train_data)
    if eval_name:
        if eval_name not in datasets:
            raise SlmopsUsageError("--config", f"{pf.where}.eval_data_config '{eval_name}' is not one of "
                                   f"{sorted(datasets)} (in {source})")
        eval_data = dict(datasets[eval_name])
        split = eval_data.pop("split", None)
        same = all(eval_data.get(k) == train_data.get(k) for k in ("data_name", "data_files"))
        if same and split:
            values["eval_split"] = split
        elif eval_data.get("data_files") and train_data.get("data_files") and not split:
            values["data_files"] = [f"train={f}" for f in train_data["data_files"]] + [f"eval={f}" for f in eval_data["data_files"]]
            values["train_split"], values["eval_split"] = "train", "eval"
        else:
            raise SlmopsUsageError("--config", f"{pf.where}.eval_data_config '{eval_name}': use the training data with "
                                   f"another split, or other data_files without a split (in {source})")
    return values


def missing_packages(plan: Plan) -> dict[str, list[str]]:
    """stage -> packages it needs that are not installed."""
    stages = [s for s, v in (("train", plan.train), ("build", plan.build)) if v is not None]
    if plan.build is not None:
        stages.append("train")  # the build loads the PyTorch model for validation
    return {s: missing for s in dict.fromkeys(stages)
            if (missing := [p for p in STAGE_PACKAGES[s] if importlib.util.find_spec(p) is None])}


@click.command("run", context_settings={"max_content_width": 120})
@click.option("--config", "--run-config", "--run_config", "config_path", type=click.Path(path_type=Path), required=True,
              help="olive workflow config (YAML or JSON); see examples/olive-config.yaml")
@click.option("--setup", is_flag=True, default=None,
              help="as olive's: set up the environment only (check the stages' packages) and stop")
@click.option("--list_required_packages", is_flag=True, default=None, help="print the packages the workflow needs and stop")
@click.option("-m", "--model_name_or_path", type=str, default=None, help="replaces the config's input model")
@click.option("-a", "--adapter_path", type=str, default=None, help="replaces the config's input adapter (build-only configs)")
@click.option("--trust_remote_code", is_flag=True, default=None, help="load the model with trust_remote_code")
@click.option("-o", "--output_path", type=str, default=None, help="replaces the config's output_dir")
@click.option("--overwrite", is_flag=True, default=None, help="replace an existing output")
@click.option("--log_level", type=click.IntRange(0, 4), default=None, help="olive's logging level (replaces log_severity_level): 0 DEBUG ... 4 CRITICAL  [default: 3]")
@click.option("--tempdir", type=str, default=None, help="root folder for temporary files (sets TMPDIR)")
@click.option("--disable_telemetry", is_flag=True, default=None, help="accepted: slmops sends no telemetry")
@click.option("--json", "as_json", is_flag=True, default=None, help="print the plan and outputs as JSON on stdout")
def run_command(config_path: Path, setup: bool | None, list_required_packages: bool | None, model_name_or_path: str | None,
                adapter_path: str | None, trust_remote_code: bool | None, output_path: str | None, overwrite: bool | None,
                log_level: int | None, tempdir: str | None, disable_telemetry: bool | None, as_json: bool | None) -> None:
    """olive run --config: run the LoRA/QLoRA training and ONNX build passes of an olive workflow config.

    Writes <output_dir>/{adapter, model, run.json} for a LoRA pass and the bundle in <output_dir>/bundle
    (or <output_dir> without a LoRA pass).

    Example: slmops run --config examples/olive-config.yaml
    """
    import json
    import os

    from slmops.configfile import load_yaml

    data = load_yaml(config_path, "olive workflow fields")
    if model_name_or_path:
        data.pop("model", None)
        data["input_model"] = {**{k: v for k, v in (data.get("input_model") or {}).items() if k == "load_kwargs"},
                               "type": "HfModel", "model_path": model_name_or_path,
                               **({"adapter_path": adapter_path} if adapter_path else {})}
    elif adapter_path:
        spec = data.get("input_model") or (data.get("model") or {}).get("config") or {}
        spec["adapter_path"] = adapter_path
    if trust_remote_code:
        data.setdefault("input_model", data.get("input_model") or {}).setdefault("load_kwargs", {})["trust_remote_code"] = True
    if output_path:
        data["output_dir"] = output_path
        data.get("engine", {}).pop("output_dir", None) if isinstance(data.get("engine"), dict) else None
    plan = plan_from_config(data, str(config_path), config_path.resolve().parent)
    apply_log_level(log_level if log_level is not None else plan.log_level)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    if setup or list_required_packages:
        needed = sorted({p for s in ("train", "build") if getattr(plan, s) is not None or s == "train"
                         for p in STAGE_PACKAGES[s]})
        missing = missing_packages(plan)
        if list_required_packages:
            click.echo("\n".join(needed))
        if missing:
            extras = ",".join(missing)
            raise click.ClickException(f"missing packages {sorted({p for v in missing.values() for p in v})}: "
                                       f"pip install 'slmops[{extras}]' (or `make install`)")
        if setup:
            click.echo(f"setup: the packages of this workflow are installed ({', '.join(needed)}); --setup only sets "
                       f"up, as olive's does: run `slmops run --config {config_path}` to execute it", err=True)
        return
    if tempdir:
        import tempfile

        os.makedirs(tempdir, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = os.path.abspath(tempdir)
    missing = missing_packages(plan)
    if missing:
        raise click.ClickException(f"this workflow needs {missing}: pip install 'slmops[{','.join(missing)}]'")
    from slmops.models import go_offline_if_hub_unreachable, is_default_model, resolve_model_path

    model = str((plan.train or plan.build or {})["model_name_or_path"])
    if not is_default_model(model) and not Path(model).exists():
        go_offline_if_hub_unreachable()
    resolve_model_path(model)  # a hub id offline fails here in a second, before torch is imported
    result: dict[str, Any] = {"output_dir": str(plan.output_dir)}
    if plan.train is not None:
        from slmops_train.config import build_config
        from slmops_train.recipe import train

        cfg = build_config({**plan.train, **({"overwrite": True} if overwrite else {})}, source=str(config_path))
        trained = train(cfg)
        click.echo(f"trained {cfg.run_name()}: {trained.adapter_dir} (base: {trained.run_dir / 'model'})", err=True)
        result["train"] = {"run_dir": str(trained.run_dir), "adapter": str(trained.adapter_dir), "metrics": trained.metrics}
    if plan.build is not None:
        from slmops_build.build import build_bundle
        from slmops_build.build import build_config as build_build_config
        from slmops_build.cli import print_summary, summary_console

        bcfg = build_build_config({**plan.build, **({"overwrite": True} if overwrite else {})}, source=str(config_path))
        out = build_bundle(bcfg, console=summary_console(stderr=True))
        print_summary(out, summary_console(stderr=True))
        result["bundle"] = str(out)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
