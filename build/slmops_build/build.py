"""The build stage: ``build_bundle(BuildConfig) -> Path``.

base model + PEFT adapters --export (onnxruntime-genai builder) + quantize per target-->
``<out>/model/`` (ONNX + genai_config + tokenizer), ``<out>/adapters/<name>.onnx_adapter``,
``<out>/bundle.json``. The bundle is built in a temp sibling and renamed into place; a rebuild
whose inputs and options did not change does nothing ("up to date").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.bundle import ABI_VERSION, SCHEMA_VERSION, AdapterInfo, BundleError, read_manifest, verify_files
from slmops.errors import SlmopsUsageError, usage_error_from_validation
from slmops.families import family_of
from slmops.fsutil import atomic_output_dir, portable_path, recover_stale, sha256_file
from slmops.models import resolve_model_path
from slmops.targets import PRECISIONS, Target, get_target

DEFAULT_OUTPUT_ROOT = Path("dist/bundles")
# quantizer options --search picks itself
SEARCHED_OPTIONS = ("block_size", "int4_block_size", "accuracy_level", "int4_accuracy_level", "fp32_last_layers", "quantizer")


class BuildConfig(BaseModel):
    """Everything one bundle build needs. Field names are the CLI option names."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = Field(None, description="target profile: cpu (int4 + float32 adapters), cuda (fp16 + fp16 adapters)")
    device: Literal["cpu", "gpu"] | None = Field(None, description="olive-style alternative to --target")
    provider: str | None = Field(None, description="olive-style alternative to --target, e.g. CUDAExecutionProvider")
    precision: Literal["fp32", "fp16", "int8", "int4"] | None = Field(None, description="override the target's base precision")
    model_name_or_path: str = Field("default", description="local HF folder, hub id, or 'default'")
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> PEFT adapter folder or train run folder")
    merge: str | None = Field(None, description="merge this adapter into the weights (a bundle without LoRA inputs)")
    lora_modules: list[str] | None = Field(None, description="modules that take runtime LoRA inputs (the adapter ABI); default all linear")
    output_path: str | None = Field(None, description="bundle folder; default dist/bundles/<target>")
    overwrite: bool = False
    extra_options: dict[str, str] = Field(default_factory=dict, description="model builder options KEY=VALUE")
    validate_bundle: bool = Field(True, description="run validation (parity vs PyTorch, perplexity)")
    validate_rows: int | None = Field(None, ge=1, description="eval rows per adapter used by validation (default: every eval row)")
    validate_max_new_tokens: int | None = Field(None, ge=1)
    max_accuracy_drop: float = Field(1.0, ge=0, description="fail if bundle accuracy/ROUGE-L drops more points than this vs "
                                     "PyTorch (and more than the paired row-flip noise)")
    min_agreement: float = Field(0.97, ge=0, le=1, description="fail if fewer than this fraction of an adapter's eval rows "
                                 "get PyTorch's own answer")
    max_ppl_increase: float = Field(10.0, ge=0, description="fail if base perplexity rises more percent than this vs fp32")
    allow_unverified: bool = Field(False, description="write the bundle even when some validation checks could not run here")
    search: bool | None = Field(False, description="measure candidate quantizations on this machine and keep the fastest "
                                "within the budget (--max_accuracy_drop, --min_agreement, --max_ppl_increase); None = "
                                "when it can (auto-opt's default: a searchable target and every adapter's run has eval rows)")
    test_check: bool = Field(False, description="after validation, fail unless every adapter is within --max_accuracy_drop "
                             "points of PyTorch on its run's test rows (which neither training nor the search saw)")

    @field_validator("adapters", mode="before")
    @classmethod
    def _parse_adapters(cls, value: Any) -> Any:
        from slmops_build.adapters import parse_adapter_specs

        if value is None:
            return {}
        if isinstance(value, str):
            value = [value]
        return parse_adapter_specs(value)

    @field_validator("extra_options", mode="before")
    @classmethod
    def _parse_extra(cls, value: Any) -> Any:
        from slmops_build.quantize import parse_extra_options

        if isinstance(value, str):
            value = [value]
        return parse_extra_options(value)

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [p.strip() for v in value for p in str(v).split(",") if p.strip()] or None
        return value

    @model_validator(mode="after")
    def _check_merge(self) -> BuildConfig:
        if self.merge is not None:
            if self.merge not in self.adapters:
                raise ValueError(f"--merge: '{self.merge}' is not one of the --adapter names {sorted(self.adapters)}")
            if len(self.adapters) > 1:
                raise ValueError("--merge: a merged bundle has no LoRA inputs, so it holds exactly one adapter; pass only that --adapter")
        if self.search:  # explicitly asked (None = auto-opt's "when it can")
            if self.merge is not None:
                raise ValueError("--search: measures adapters served beside the base model; drop --merge or --search")
            if not self.adapters:
                raise ValueError("--search: compares adapters' answers with PyTorch's; pass at least one --adapter NAME=RUN")
            chosen = sorted(set(self.extra_options) & set(SEARCHED_OPTIONS))
            if chosen:
                raise ValueError(f"--extra_option: {chosen} are what --search chooses; drop them or --search")
        return self

    def resolve_target(self) -> Target:
        return get_target(self.target, self.device, self.provider, self.precision)

    def output_dir(self, target: Target) -> Path:
        return Path(self.output_path) if self.output_path else DEFAULT_OUTPUT_ROOT / target.name


def build_config(values: dict[str, Any], source: str = "") -> BuildConfig:
    """Validate ``values`` into a BuildConfig; errors name the option (exit 2 at the CLI)."""
    values = dict(values)
    if "validate" in values:  # YAML may say `validate: false`
        values["validate_bundle"] = values.pop("validate")
    if "adapter" in values:
        values["adapters"] = values.pop("adapter")
    if "extra_option" in values:
        values["extra_options"] = values.pop("extra_option")
    if values.get("search") == "auto":
        values["search"] = None
    try:
        return BuildConfig(**values)
    except ValidationError as exc:
        raise usage_error_from_validation(
            exc, "build", source,
            aliases={"--adapters": "--adapter", "--extra_options": "--extra_option", "--validate_bundle": "--validate"},
            hints={("literal_error", "--precision"): f"PRECISIONS are {list(PRECISIONS)}"},
        ) from exc


def load_build_yaml(path: str | Path) -> dict[str, Any]:
    """A build YAML: any BuildConfig field; relative adapter paths resolve against the cwd, else the file."""
    from slmops.configfile import load_yaml

    path = Path(path)
    data = load_yaml(path)
    adapters = data.get("adapters")
    if isinstance(adapters, dict):
        resolved = {}
        for name, value in adapters.items():
            p = Path(str(value)).expanduser()
            if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
                p = path.parent / p
            resolved[str(name)] = str(p)
        data["adapters"] = resolved
    return data


# ---- build key ------------------------------------------------------------------------------
def _dir_digest(folder: Path, names: list[str] | None = None, exclude_suffixes: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if (names is not None and path.name not in names) or path.name.endswith(exclude_suffixes):
            continue
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _code_digest() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()


def build_key(config: BuildConfig, target: Target, modules: list[str], base_sha: str, model_dir: str | Path,
              adapter_dirs: dict[str, Path]) -> str:
    """Hash of everything that decides the bundle's content: options, inputs, producer versions, code."""
    from slmops_build.bundle_writer import producer_versions

    payload = {
        "schema": SCHEMA_VERSION, "abi": ABI_VERSION, "target": dataclasses.asdict(target), "lora_modules": modules,
        "merge": config.merge, "extra_options": config.extra_options,
        "validation": [config.validate_bundle, config.validate_rows, config.validate_max_new_tokens,
                       config.max_accuracy_drop, config.max_ppl_increase, config.min_agreement],
        "search": [config.search, config.test_check],
        "base_weights": base_sha,
        "base_files": _dir_digest(Path(model_dir), exclude_suffixes=(".safetensors", ".bin", ".gguf", ".pt")),
        "adapters": {name: [_dir_digest(d), _dir_digest(d.parent, names=["run.json"])] for name, d in sorted(adapter_dirs.items())},
        "producer": producer_versions(),
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def recorded_config(config: BuildConfig) -> dict[str, Any]:
    """The options as bundle.json records them: paths name no folder of the build machine."""
    values = config.model_dump(exclude={"overwrite"})
    values["model_name_or_path"] = portable_path(config.model_name_or_path)
    values["adapters"] = {name: portable_path(path) for name, path in config.adapters.items()}
    if config.output_path:
        values["output_path"] = portable_path(config.output_path)
    return values


def is_up_to_date(out: Path, key: str) -> bool:
    if not (out / "bundle.json").is_file():
        return False
    try:
        manifest = read_manifest(out)
    except (BundleError, ValueError, OSError):
        return False
    return manifest.build_key == key and not verify_files(out, manifest)


# ---- merge ----------------------------------------------------------------------------------
def merge_adapter(model_dir: str | Path, adapter_dir: Path, out: Path) -> Path:
    """base + PEFT adapter -> merged fp32 HF folder (peft ``merge_and_unload``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops_build.validate import quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out


# ---- the build ------------------------------------------------------------------------------
QKV = ("q_proj", "k_proj", "v_proj", "qkv_proj")


def fuses_qkv_into_attention(target: Target) -> bool:
    """Whether the model builder's graph for ``target`` has no q/k/v MatMul to attach LoRA to.

    With fp32 inputs on CUDA the builder cannot use GroupQueryAttention (fp16/bf16 only there) and
    emits the packed contrib ``Attention`` op, which holds the q/k/v weights itself.
    """
    return target.execution_provider == "cuda" and target.precision == "fp32"


def check_fused_attention(target: Target, lora_modules: list[str] | None, adapters: dict[str, Any], merge: bool) -> None:
    """Refuse, before the export, adapters (or an explicit --lora_modules) on q/k/v for a graph that
    cannot take them. The default modules then simply leave q/k/v out of the adapter ABI."""
    if merge or not fuses_qkv_into_attention(target):
        return
    asked = sorted(set(lora_modules or []) & set(QKV))
    if asked:
        raise SlmopsUsageError("--lora_modules", f"{asked}: fp32 on {target.name} fuses q/k/v into one Attention op (no "
                               "GroupQueryAttention in fp32 on CUDA), so they cannot take LoRA inputs; use --precision "
                               f"fp16 (the {target.name} default) or leave them out")
    bad = {name: sorted(set(a.modules) & set(QKV)) for name, a in adapters.items() if set(a.modules) & set(QKV)}
    if bad:
        first = next(iter(bad))
        raise SlmopsUsageError("--precision", f"fp32 on {target.name} fuses q/k/v into one Attention op (no "
                               f"GroupQueryAttention in fp32 on CUDA), so LoRA cannot reach {bad[first]} of adapter "
                               f"'{first}'; use --precision fp16 (the {target.name} default) or --merge {first}")


def _search_by_default(config: BuildConfig, target: Target, adapters: dict[str, Any], console: Any) -> bool:
    """auto-opt's default: search when the target can be searched and every adapter has eval rows."""
    from slmops.runrecord import RunRecordError, read_validation_rows
    from slmops_build.search import searchable

    why = searchable(target) or ("--merge" if config.merge else None) or (None if adapters else "no --adapter")
    if config.extra_options.keys() & set(SEARCHED_OPTIONS):
        why = "--extra_option sets the quantization"
    for name, adapter in adapters.items():
        if why:
            break
        try:
            rows = read_validation_rows(adapter.run_dir, adapter.record, "eval") if adapter.run_dir and adapter.record else None
        except RunRecordError:
            rows = None
        if rows is None or not rows.prompts:
            why = f"adapter {name} has no eval rows in a run.json beside it"
    if why:
        console.print(f"no quantization search ({why}): the target's recipe")
    return why is None


def _search(config: BuildConfig, target: Target, model_dir: Path, modules: list[str], adapters: dict[str, Any], tmp: Path,
            work: Path, bounds: Any, export_report: dict[str, Any], console: Any) -> tuple[Any, dict[str, Any]]:
    """ONE fp32 export, the candidates quantized from it and measured; the pick becomes ``tmp/model``."""
    from slmops_build.adapters import convert_adapter
    from slmops_build.export import export_base_model
    from slmops_build.search import SearchError, run_search
    from slmops_build.validate import BuildValidationError

    console.print(f"exporting {model_dir.name} once (fp32, LoRA inputs on {modules}) to search {target.name}'s quantization")
    fp32_dir = work / "fp32"
    template = export_base_model(model_dir, fp32_dir, target.with_precision("fp32"), modules, config.extra_options,
                                 work_dir=work / "export", report=export_report)
    converted = {}
    for name, adapter in adapters.items():
        path = work / "adapters" / f"{name}.onnx_adapter"
        convert_adapter(adapter.adapter_dir, template, template.dtype, path, name=name)
        converted[name] = (adapter, path)
    console.print("searching: candidates vs PyTorch fp32+PEFT on the eval rows, then decode speed")
    threads = int(target.session_options.get("intra_op_num_threads", 2))
    try:
        picked, report = run_search(model_dir, fp32_dir, work / "candidates", target, template, converted, bounds,
                                    config.extra_options, console.print, threads=threads)
    except SearchError as exc:
        raise BuildValidationError([str(exc)], {"search": exc.report}) from exc
    shutil.move(str(picked), tmp / "model")
    export_report["quantization"] = {"method": "slmops", "search_pick": report["pick"], **report["pick_options"]}
    print_search_table(report, console)
    return template, report


def _test_check(model_dir: Path, template: Any, adapters: dict[str, Any], bounds: Any, hf_model_dir: str | Path,
                target: Target, console: Any) -> dict[str, Any]:
    """Every adapter within ``max_accuracy_drop`` points of PyTorch on its run's test rows (which
    neither training nor the search saw), or BuildValidationError saying which and by how much."""
    from slmops_build.search import SearchError, pytorch_side, quality
    from slmops_build.validate import BuildValidationError

    console.print("checking the bundle on the adapters' test rows (held out from training and the search)")
    test_bounds = dataclasses.replace(bounds, split="test", rows=None)
    eos = set(read_genai_eos(model_dir))
    try:
        side = pytorch_side(Path(hf_model_dir), adapters, test_bounds, eos)
    except SearchError as exc:
        raise BuildValidationError([f"--test_check: {exc}"], {"test_rows": str(exc)}) from exc
    result = quality(model_dir, template, side, test_bounds, int(target.session_options.get("intra_op_num_threads", 2)))
    failures = [f"adapter {name}: {e['metric']} {e['bundle']:.3f} on the test rows vs {e['pytorch']:.3f} in PyTorch "
                f"(drop {e['drop_points']} points > {bounds.max_accuracy_drop}; {e['rows_same']}/{e['rows']} answers identical)"
                for name, e in result["adapters"].items() if e["drop_points"] > bounds.max_accuracy_drop]
    report = {"adapters": result["adapters"], "max_accuracy_drop_points": bounds.max_accuracy_drop,
              "passed": not failures, "failures": failures, "seconds": round(side.seconds + result["quality_s"], 2)}
    for name, e in result["adapters"].items():
        console.print(f"  {name} test rows: {e['metric']} {e['bundle']:.3f} vs PyTorch {e['pytorch']:.3f}, "
                      f"{e['rows_same']}/{e['rows']} answers identical")
    if failures:
        raise BuildValidationError(failures, {"test_rows": report})
    return report


def read_genai_eos(model_dir: Path) -> tuple[int, ...]:
    from slmops.contract import GenaiConfig

    return GenaiConfig.read(model_dir).eos_ids


def print_search_table(report: dict[str, Any], console: Any) -> None:
    """The search's candidates as a rich table, then the pick and why."""
    from rich.table import Table

    candidates = report.get("candidates", [])
    adapters = list(candidates[0]["quality"]["adapters"]) if candidates else []
    speed_cases = [k for k in (candidates[0].get("speed") or {}) if k != "one_stream_mean"] if candidates else []
    table = Table("candidate", *[f"{a} agree" for a in adapters], *[f"{a} drop (pts)" for a in adapters], "ppl +%",
                  *[f"tok/s {c}" for c in speed_cases], "vs default", "budget", title="quantization search")
    front = set(report.get("pareto_front", []))
    for row in candidates:
        q = row["quality"]["adapters"]
        speed = row.get("speed") or {}
        name = row["name"] + (" *" if row["name"] in front else "") + (" [bold green](pick)[/]" if row["name"] == report.get("pick") else "")
        table.add_row(name, *[f"{q[a]['agreement']:.0%}" for a in adapters],
                      *[f"{q[a]['drop_points']:g} ±{q[a]['noise_margin_points']:g}" for a in adapters],
                      f"{row['quality']['ppl_increase_pct']:g}", *[f"{speed.get(c, '-')}" for c in speed_cases],
                      f"{row.get('speed_vs_default', '-')}", "ok" if row["within_budget"] else "[red]out[/]")
    console.print(table)
    console.print(f"* = Pareto front (speed vs lowest agreement). pick: {report.get('reason')}")


def build_bundle(config: BuildConfig, console: Any = None) -> Path:
    """Build (or find up to date) the bundle ``config`` describes; return its folder."""
    from rich.console import Console

    from slmops_build.adapters import convert_adapter, load_peft_adapter
    from slmops_build.bundle_writer import base_model_info, write_manifest
    from slmops_build.export import check_lora_modules, covered_modules, export_base_model
    from slmops_build.quantize import check_precision
    from slmops_build.validate import (
        Bounds,
        BuildValidationError,
        TorchAnswers,
        can_run,
        other_arch,
        validate_bundle,
    )

    console = console or Console(stderr=True)
    started = time.time()
    target = config.resolve_target()
    check_precision(target)
    if config.search:
        from slmops_build.search import searchable

        why_not = searchable(target)
        if why_not:
            raise SlmopsUsageError("--search", why_not)
    out = config.output_dir(target)
    model_dir = resolve_model_path(config.model_name_or_path)
    family = family_of(model_dir)  # an architecture the builder cannot export is refused here, before any work
    modules = check_lora_modules(config.lora_modules, family)
    base = base_model_info(model_dir, config.model_name_or_path)
    merge = config.merge is not None
    adapters = {
        name: load_peft_adapter(name, path, base.sha256, None if merge else covered_modules(modules, family), merge=merge)
        for name, path in config.adapters.items()
    }
    check_fused_attention(target, config.lora_modules, adapters, merge)
    if config.search is None:
        config = config.model_copy(update={"search": _search_by_default(config, target, adapters, console)})
    key = build_key(config, target, modules, base.sha256, model_dir, {n: a.adapter_dir for n, a in adapters.items()})
    recover_stale(out)  # a build killed (kill -9) mid-swap left the old bundle aside: back first, then compare
    if is_up_to_date(out, key):
        validation = read_manifest(out).validation
        if validation.get("status") == "unverified" and config.validate_bundle and not config.allow_unverified:
            raise BuildValidationError(list(validation.get("unverified", [])), validation, status="unverified")
        console.print(f"[green]up to date[/] {out} (build key {key[:12]}); nothing to do")
        return out
    if config.validate_bundle and not config.allow_unverified:
        _, why = can_run(target)  # a reason when the target's provider is not here, else ""
        why = why or other_arch(target) or ""
        if why:  # fail before the export: this machine cannot check all of this bundle
            raise BuildValidationError([why], {"status": "unverified", "unverified": [why]}, status="unverified")

    timings: dict[str, float] = {}
    export_report: dict[str, Any] = {}
    search_report: dict[str, Any] | None = None
    torch_answers: dict[str, TorchAnswers] | None = None  # PyTorch's eval answers, when the search made them
    bounds = Bounds(rows=config.validate_rows, max_accuracy_drop=config.max_accuracy_drop, min_agreement=config.min_agreement,
                    max_ppl_increase=config.max_ppl_increase, max_new_tokens=config.validate_max_new_tokens)
    with atomic_output_dir(out, config.overwrite) as tmp:
        work = Path(tempfile.mkdtemp(prefix="slmops-build-"))
        try:
            t0 = time.time()
            if merge:
                assert config.merge is not None
                console.print(f"merging adapter [bold]{config.merge}[/] into the base weights")
                merged_dir = merge_adapter(model_dir, adapters[config.merge].adapter_dir, work / "merged")
                template = export_base_model(merged_dir, tmp / "model", target, None, config.extra_options,
                                             work_dir=work / "export", with_lora=False, report=export_report)
            elif config.search:
                template, search_report = _search(config, target, Path(model_dir), modules, adapters, tmp, work, bounds,
                                                  export_report, console)
                torch_answers = search_report.pop("_torch_answers", None)
            else:
                console.print(f"exporting {base.name} for target [bold]{target.name}[/] ({target.precision}, LoRA inputs on {modules})")
                template = export_base_model(model_dir, tmp / "model", target, modules, config.extra_options,
                                             work_dir=work / "export", report=export_report)
            timings["export_s"] = round(time.time() - t0, 2)

            t0 = time.time()
            infos: dict[str, AdapterInfo] = {}
            onnx_adapters: dict[str, Any] = {}
            if not merge:
                for name, adapter in adapters.items():
                    path = tmp / "adapters" / f"{name}.onnx_adapter"
                    info = convert_adapter(adapter.adapter_dir, template, template.dtype, path, name=name)
                    info.file = f"adapters/{name}.onnx_adapter"
                    infos[name] = info
                    onnx_adapters[name] = (adapter, path)
            timings["convert_s"] = round(time.time() - t0, 2)

            t0 = time.time()
            if config.validate_bundle:
                console.print("validating the bundle (slmops.runtime vs PyTorch)")
                validation = validate_bundle(tmp, model_dir, template, target, onnx_adapters, bounds,
                                             merged=adapters[config.merge] if config.merge else None,
                                             torch_answers=torch_answers)
                if validation["status"] == "failed":
                    raise BuildValidationError(validation["failures"], validation)
                if validation["status"] == "unverified" and not config.allow_unverified:
                    raise BuildValidationError(validation["unverified"], validation, status="unverified")
            else:
                # Not checked, by request: the bundle says so, and --no-validate is the permission.
                validation = {"skipped": "--no-validate", "status": "unverified", "unverified": ["validation not run (--no-validate)"],
                              "passed": False}
            timings["validate_s"] = round(time.time() - t0, 2)
            if config.test_check and not merge:
                t0 = time.time()
                validation["test_rows"] = _test_check(tmp / "model", template, onnx_adapters, bounds, model_dir, target, console)
                timings["test_check_s"] = round(time.time() - t0, 2)
            for name, info in infos.items():
                entry = validation.get("adapters", {}).get(name, {})
                info.eval_metrics = {k: entry[k] for k in ("metric", "bundle", "pytorch", "drop_points", "noise_margin_points",
                                                                   "agreement", "token_agreement", "rows") if k in entry}
            timings["total_s"] = round(time.time() - started, 2)
            build_info = {
                "config": recorded_config(config),
                "model_path": portable_path(model_dir),
                "lora_modules": modules,
                "builder_options": {**{k: str(v) for k, v in target.builder_options.items()}, **config.extra_options,
                                    **(search_report or {}).get("pick_options", {})},
                "session_options": target.session_options,
                "export": export_report,
                "timings": timings,
            }
            if search_report is not None:
                build_info["search"] = search_report
            write_manifest(tmp, target, template, base, infos, validation, key, build_info,
                           merged_adapter=config.merge)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out
