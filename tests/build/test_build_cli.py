"""`slmops build` and `slmops bundle` as a user runs them: bundle contents, checksums, validation,
rebuild skipping, verify, bad inputs (exit 2, one line, no partial bundle), cuda and merged bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from slmops.bundle import read_manifest
from slmops.fsutil import sha256_file
from slmops.models import model_weights_sha256
from tests.conftest import run_cli


@pytest.fixture(scope="session")
def cli_bundle(tiny_model_dir: Path, tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`slmops build` (subprocess, default cpu target = int4) with two adapters, one given as NAME=PATH,
    one as a bare run folder."""
    out = tmp_path_factory.mktemp("bundles") / "cpu"
    args = ["build", "-m", str(tiny_model_dir), "--adapter", f"tone={tiny_runs['tone']}", "--adapter",
            str(tiny_runs["extract"]), "-o", str(out), "--validate_rows", "8",
            # a random tiny model's int4 greedy answers flip on near-ties (3 of 8 rows): the agreement
            # gate is tested in test_validate_gate.py / test_search.py; here the bundle's contents are
            "--min_agreement", "0"]
    proc = run_cli(args)
    return {"proc": proc, "out": out, "args": args}


def test_build_writes_a_checked_bundle(cli_bundle: dict[str, Any], tiny_model_dir: Path) -> None:
    proc, out = cli_bundle["proc"], cli_bundle["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert {"model/model.onnx", "model/model.onnx.data", "model/genai_config.json", "model/tokenizer.json",
            "adapters/tone.onnx_adapter", "adapters/extract.onnx_adapter"} <= set(manifest.files)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"bundle.json"}
    assert on_disk == set(manifest.files)
    assert all(sha256_file(out / rel) == sha for rel, sha in manifest.files.items())
    assert (manifest.target.name, manifest.target.precision, manifest.target.adapter_dtype) == ("cpu", "int4", "float32")
    assert manifest.base_model.sha256 == model_weights_sha256(tiny_model_dir)
    assert len(manifest.lora_template.inputs) == 16 and manifest.lora_template.num_layers == 2  # 4 packed pairs x 2 layers
    tone, extract = manifest.adapters["tone"], manifest.adapters["extract"]
    assert (tone.rank, tone.alpha, tone.target_modules, tone.file) == (4, 8.0, ["q_proj", "v_proj"], "adapters/tone.onnx_adapter")
    assert extract.rank == 8 and len(extract.target_modules) == 7
    assert tone.eval_metrics["metric"] == "accuracy" and extract.eval_metrics["metric"] == "rouge_l"
    validation = manifest.validation
    assert validation["passed"] and validation["functional"] == "ran"
    assert set(validation["perplexity"]) >= {"fp32", "int4", "increase_pct"}
    for name in ("tone", "extract"):
        entry = validation["adapters"][name]
        assert entry["rows"] == 8 and entry["logit_max_abs_diff_vs_base"] > 0 and "drop_points" in entry
    assert {"slmops", "onnxruntime", "onnxruntime-genai", "transformers", "peft"} <= set(manifest.producer)
    assert manifest.build_key and manifest.build["timings"]["total_s"] > 0
    assert "validation passed" in proc.stdout and "tone" in proc.stdout


def test_int4_graph_keeps_lora_matmuls_float(cli_bundle: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(cli_bundle["out"] / "model" / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["/model/layers.0/attn/qkv_proj/lora_A/MatMul"] == "MatMul"
    assert ops["/model/layers.1/mlp/down_proj/lora_B/MatMul"] == "MatMul"
    assert ops["/model/layers.0/attn/qkv_proj/MatMul_Q4"] == "MatMulNBits"
    assert ops["/model/layers.0/mlp/gate_up_proj/MatMul_Q4"] == "MatMulNBits"


def test_rebuild_with_nothing_changed_does_no_work(cli_bundle: dict[str, Any]) -> None:
    before = (cli_bundle["out"] / "bundle.json").read_bytes()
    proc = run_cli(cli_bundle["args"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up to date" in proc.stderr
    assert (cli_bundle["out"] / "bundle.json").read_bytes() == before


def test_verify_passes_then_fails_on_a_corrupt_file(cli_bundle: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(cli_bundle["out"], bundle)
    ok = run_cli(["bundle", "verify", str(bundle)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok" in ok.stdout and "loaded and run with the server's runtime" in ok.stdout
    inspect = run_cli(["bundle", "inspect", str(bundle), "--json"])
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["adapters"]["tone"]["rank"] == 4
    path = bundle / "adapters" / "tone.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (bundle / "model" / "tokenizer_config.json").unlink()
    bad = run_cli(["bundle", "verify", str(bundle)])
    assert bad.returncode == 1
    assert "adapters/tone.onnx_adapter: sha256 mismatch" in bad.stdout
    assert "model/tokenizer_config.json: missing" in bad.stdout


# ---- bad inputs: exit 2, one line naming the option, nothing written ------------------------
def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from slmops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def _broken(tiny_runs: dict[str, Path], tmp_path: Path, case: str) -> Path:
    run = tmp_path / "broken"
    shutil.copytree(tiny_runs["tone"], run)
    adapter = run / "adapter"
    if case == "no_config":
        (adapter / "adapter_config.json").unlink()
    elif case == "base_sha":
        (adapter / "slmops_adapter.json").write_text(json.dumps({"base_model_sha256": "f" * 64}))
    elif case == "corrupt":
        (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    elif case == "dora":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return run


@pytest.mark.parametrize("case,option,words", [
    ("target", "--target", "unknown target 'tpu'"),
    ("no_config", "--adapter", "has no adapter_config.json"),
    ("base_sha", "--adapter", "trained on a base model"),
    ("corrupt", "--adapter", "cannot be read"),
    ("dora", "--adapter", "DoRA"),
    ("outside_abi", "--adapter", "outside the bundle's adapter ABI"),
    ("precision", "--precision", "not supported on the cpu target"),
    ("extra_option", "--extra_option", "not KEY=VALUE"),
    ("merge", "--merge", "not one of the --adapter names"),
    ("exists", "--output_path", "pass --overwrite"),
])
def test_bad_input_exits_2_naming_the_option(case: str, option: str, words: str, tiny_model_dir: Path,
                                             tiny_runs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dist" / "cpu"
    args = ["build", "-m", str(tiny_model_dir), "-o", str(out), "--adapter", f"tone={tiny_runs['tone']}"]
    if case == "target":
        args += ["--target", "tpu"]
    elif case in ("no_config", "base_sha", "corrupt", "dora"):
        args[-1] = f"tone={_broken(tiny_runs, tmp_path, case)}"
    elif case == "outside_abi":
        args += ["--adapter", f"extract={tiny_runs['extract']}", "--lora_modules", "q_proj,v_proj"]
    elif case == "precision":
        args += ["--precision", "fp16"]
    elif case == "extra_option":
        args += ["--extra_option", "int4_block_size"]
    elif case == "merge":
        args += ["--merge", "nope"]
    elif case == "exists":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    code, err = _main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"Error: {option}:") and words in lines[0], lines[0]
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")] if out.parent.exists() else []
    assert leftovers == []


def test_bad_target_via_the_real_entry_point(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(["build", "--target", "tpu", "-m", str(tiny_model_dir), "-o", str(tmp_path / "x")])
    from slmops.targets import TARGETS

    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"Error: --target: unknown target 'tpu'; choose one of {sorted(TARGETS)}"]
    assert not (tmp_path / "x").exists()


# ---- other targets and modes ----------------------------------------------------------------
def test_cuda_target_builds_fp16_without_running(tiny_model_dir: Path, tiny_runs: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops_build.build import build_bundle, build_config
    from slmops_build.export import read_template
    from slmops_build.validate import BuildValidationError

    from slmops.contract import read_adapter_tensors, read_genai_config

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    values = {"target": "cuda", "model_name_or_path": str(tiny_model_dir), "adapters": {"tone": str(tiny_runs["tone"])},
              "output_path": str(tmp_path / "cuda")}
    # No CUDA here: nothing can check the bundle, so it is refused before the export unless allowed.
    with pytest.raises(BuildValidationError, match="CUDAExecutionProvider is not available") as refused:
        build_bundle(build_config(values))
    assert refused.value.status == "unverified" and not (tmp_path / "cuda").exists()
    out = build_bundle(build_config({**values, "allow_unverified": True}))
    manifest = read_manifest(out)
    assert (manifest.target.execution_provider, manifest.target.precision, manifest.target.adapter_dtype) == ("cuda", "fp16", "float16")
    assert read_template(out / "model").dtype == "float16"
    assert {str(a.dtype) for a in read_adapter_tensors(out / "adapters" / "tone.onnx_adapter").values()} == {"float16"}
    assert "cuda" in json.dumps(read_genai_config(out / "model")["model"]["decoder"]["session_options"]["provider_options"])
    validation = manifest.validation
    assert validation["status"] == "unverified" and not validation["passed"] and validation["functional"] == "skipped"
    assert "not available" in validation["unverified"][0]


def test_merge_builds_a_single_adapter_bundle_without_lora_inputs(tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops_build.build import build_bundle, build_config
    from slmops_build.export import read_template

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    out = build_bundle(build_config({"precision": "fp32", "model_name_or_path": str(tiny_model_dir), "merge": "tone",
                                     "adapters": {"tone": str(tiny_runs["tone"])}, "output_path": str(tmp_path / "merged"),
                                     "validate_rows": 6}))
    manifest = read_manifest(out)
    assert manifest.merged_adapter == "tone" and manifest.adapters == {}
    assert manifest.lora_template.inputs == [] and read_template(out / "model").inputs == []
    entry = manifest.validation["adapters"]["tone"]
    assert manifest.validation["passed"] and entry["token_agreement"] == 1.0 and entry["drop_points"] == 0
    assert abs(manifest.validation["perplexity"]["increase_pct"]) < 0.1


def test_yaml_config_with_cli_overrides(tiny_model_dir: Path, tiny_runs: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """-c build.yaml: adapters relative to the file, extra_options as a mapping; the CLI wins."""
    from slmops.cli import main

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    shutil.copytree(tiny_runs["tone"], tmp_path / "runs" / "tone")
    (tmp_path / "build.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nprecision: int8\nadapters:\n  tone: runs/tone\n"
        "extra_options:\n  int4_block_size: 32\nvalidate: false\nlora_modules: q_proj,v_proj\n")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path.parent)
    main(["build", "-c", str(tmp_path / "build.yaml"), "--precision", "fp32", "-o", str(out)])
    manifest = read_manifest(out)
    assert manifest.target.precision == "fp32" and manifest.validation["skipped"] == "--no-validate"
    assert manifest.validation["status"] == "unverified" and not manifest.validation["passed"]
    # q,v live in the packed qkv projection, which can take k as well
    assert manifest.lora_template.modules == ["q_proj", "k_proj", "v_proj"] and len(manifest.lora_template.inputs) == 4
    assert manifest.build["builder_options"]["int4_block_size"] == "32"
    assert list(manifest.adapters) == ["tone"]
    assert "tone" in capsys.readouterr().out

