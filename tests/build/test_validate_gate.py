"""Build validation on real bundles: a deliberately mis-converted adapter fails the accuracy gate,
the correct conversion of the same adapter passes, and checks that cannot run make the bundle
``unverified`` (exit 1 unless ``--allow-unverified``) instead of ``passed``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from slmops.bundle import read_manifest


def _build(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from slmops.cli import main

    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return int(code or 0), capsys.readouterr().err


def _args(model: Path, run: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "-m", str(model), "--precision", "fp32", "--adapter", f"joy={run}", "-o", str(out), *extra]


def test_misconverted_adapter_fails_the_accuracy_gate(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The converter writes B with the wrong sign (a real conversion bug class: a lost scale/transpose);
    the real validator must catch it from the task rows alone."""
    import slmops_build.adapters as adapters

    from slmops.contract import read_adapter_tensors, write_adapter_tensors

    real_convert = adapters.convert_adapter

    def sign_flipped(*args: Any, **kwargs: Any) -> Any:
        info = real_convert(*args, **kwargs)
        out_path = Path(args[3])
        arrays = read_adapter_tensors(out_path)
        write_adapter_tensors({k: -v if ".lora_B." in k else v for k, v in arrays.items()}, out_path)
        return info

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    monkeypatch.setattr(adapters, "convert_adapter", sign_flipped)
    out = tmp_path / "dist" / "cpu"
    code, err = _build(_args(tiny_model_dir, joy_run, out), capsys)
    assert code == 1, err
    assert "bundle validation failed" in err and "adapter joy: accuracy" in err and "nothing was written" in err
    assert "1.000 in PyTorch" in err and "beyond the" in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial bundle left behind


def test_correct_conversion_of_the_same_adapter_passes(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    out = tmp_path / "cpu"
    code, err = _build(_args(tiny_model_dir, joy_run, out), capsys)
    assert code == 0, err
    validation = read_manifest(out).validation
    entry = validation["adapters"]["joy"]
    assert validation["status"] == "passed" and validation["passed"] and validation["unverified"] == []
    assert validation["rows"] == "all" and entry["rows"] == 10  # every eval row by default
    assert entry["pytorch"] == 1.0 and entry["bundle"] == 1.0 and entry["drop_points"] == 0
    assert entry["min_detectable_drop_points"] == 40.0  # 4 same-direction flips of 10 rows


def _run_with_missing_data(joy_run: Path, tmp_path: Path) -> Path:
    """The run folder without its rendered eval rows (the build reads only those, never the training data)."""
    run = tmp_path / "moved"
    shutil.copytree(joy_run, run)
    (run / json.loads((run / "run.json").read_text())["validation"]["splits"]["eval"]["file"]).unlink()
    return run


def test_unloadable_eval_data_is_unverified_not_passed(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    run = _run_with_missing_data(joy_run, tmp_path)
    out = tmp_path / "cpu"
    code, err = _build(_args(tiny_model_dir, run, out), capsys)
    assert code == 1 and "bundle unverified" in err and "eval data of the run cannot be loaded" in err
    assert "--allow-unverified" in err and not out.exists()

    code, err = _build(_args(tiny_model_dir, run, out, "--allow-unverified"), capsys)
    assert code == 0, err
    validation = read_manifest(out).validation
    assert validation["status"] == "unverified" and not validation["passed"]
    assert any("adapter joy: accuracy parity not checked" in r for r in validation["unverified"])
    # a rebuild with nothing changed is up to date, and still refused without the flag
    code, err = _build(_args(tiny_model_dir, run, out), capsys)
    assert code == 1 and "bundle unverified" in err


def test_a_bundle_for_another_architecture_is_unverified_not_passed(tiny_model_dir: Path, joy_run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """cpu-arm64 built on x86 (or cpu built on arm64): every check runs, on this machine's kernels,
    and the bundle says its own architecture's answers were not checked."""
    from slmops.platforms import host_arch

    monkeypatch.setenv("SLMOPS_BUILDER_IN_PROCESS", "1")
    here = host_arch()
    target, other = ("cpu", "amd64") if here == "arm64" else ("cpu-arm64", "arm64")
    out = tmp_path / target
    code, err = _build(_args(tiny_model_dir, joy_run, out, "--target", target), capsys)
    assert code == 1 and "bundle unverified" in err and f"{other} kernels" in err, err
    assert not out.exists()  # refused before the export

    code, err = _build(_args(tiny_model_dir, joy_run, out, "--target", target, "--allow-unverified"), capsys)
    assert code == 0, err
    validation = read_manifest(out).validation
    assert validation["status"] == "unverified" and not validation["passed"] and validation["kernels"] == here
    assert [r for r in validation["unverified"] if r.startswith(f"{other} kernels")], validation["unverified"]
    entry = validation["adapters"]["joy"]  # the checks themselves ran, here
    assert validation["functional"] == "ran" and entry["bundle"] == 1.0 and entry["pytorch"] == 1.0
