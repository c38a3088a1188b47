"""Architectures: the cpu-arm64 target, bundle.json's target.arch, and `slmops serve` refusing a
bundle built for another architecture (unless --force)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from slmops.bundle import ABI_VERSION, SCHEMA_VERSION
from slmops.errors import SlmopsUsageError
from slmops.platforms import arch_mismatch, bundle_arch, check_bundle_arch, host_arch, normalize_arch
from slmops.targets import TARGETS, get_target
from tests.conftest import run_cli


@pytest.mark.parametrize(("name", "arch"), [("x86_64", "amd64"), ("AMD64", "amd64"), ("aarch64", "arm64"),
                                            ("arm64", "arm64"), ("riscv64", "riscv64"), ("", None)])
def test_normalize_arch(name: str, arch: str | None) -> None:
    assert normalize_arch(name) == arch


def test_cpu_arm64_target_settings() -> None:
    t = get_target("cpu-arm64")
    assert t.arch == "arm64" and t.execution_provider == "cpu" and t.precision == "int4"
    assert t.builder_options["int4_block_size"] == 32 and t.builder_options["int4_accuracy_level"] == 4
    assert t.session_options["intra_op_num_threads"] == 4
    assert get_target("cpu").arch == "amd64"
    # olive's --provider still means the amd64 cpu target
    assert get_target(provider="CPUExecutionProvider").name == "cpu"
    assert get_target("cpu-arm64", precision="fp32").arch == "arm64"


def _manifest(name: str, arch: str | None) -> SimpleNamespace:
    return SimpleNamespace(target=SimpleNamespace(name=name, arch=arch))


def test_bundle_arch_falls_back_to_the_target_profile() -> None:
    assert bundle_arch(_manifest("cpu", None)) == "amd64"  # bundles written before target.arch
    assert bundle_arch(_manifest("cpu-arm64", None)) == "arm64"
    assert bundle_arch(_manifest("cpu", "aarch64")) == "arm64"
    assert bundle_arch(_manifest("someday", None)) is None


def test_check_bundle_arch_refuses_unless_forced() -> None:
    assert check_bundle_arch(_manifest("cpu-arm64", "arm64"), machine="arm64") is None
    with pytest.raises(SlmopsUsageError) as err:
        check_bundle_arch(_manifest("cpu", "amd64"), machine="arm64")
    assert err.value.option == "BUNDLE_DIR"
    assert "built for amd64, this machine is arm64" in err.value.message
    assert "--target cpu-arm64" in err.value.message and "--force" in err.value.message
    warning = check_bundle_arch(_manifest("cpu", "amd64"), force=True, machine="arm64")
    assert warning is not None and warning.startswith("warning:")
    assert arch_mismatch(None, "arm64") is None  # unknown: nothing to refuse


def _bundle_json(folder: Path, target: str) -> Path:
    """A bundle.json alone: enough for serve's architecture check, which runs before any file is read."""
    t = TARGETS[target]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bundle.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "created_at": "2026-11-30T00:00:00+00:00",
        "target": {"name": t.name, "execution_provider": t.execution_provider, "precision": t.precision,
                   "adapter_dtype": t.adapter_dtype, "arch": t.arch, "provider": t.provider},
        "base_model": {"name": "x", "source": "x", "sha256": "0" * 64},
        "files": {"model/model.onnx": "0" * 64},
        "lora_template": {"abi_version": ABI_VERSION, "modules": [], "num_layers": 0, "dtype": "float32", "inputs": []},
    }))
    return folder


def test_serve_refuses_a_bundle_of_another_arch(tmp_path: Path) -> None:
    other = "cpu-arm64" if host_arch() == "amd64" else "cpu"
    bundle = _bundle_json(tmp_path / other, other)
    proc = run_cli(["serve", str(bundle), "--port", "0", "--no-metrics"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "BUNDLE_DIR" in lines[0] and f"built for {TARGETS[other].arch}" in lines[0], proc.stderr
    assert "--force" in lines[0]


def test_serve_force_gets_past_the_arch_check(tmp_path: Path) -> None:
    other = "cpu-arm64" if host_arch() == "amd64" else "cpu"
    bundle = _bundle_json(tmp_path / other, other)
    proc = run_cli(["serve", str(bundle), "--port", "0", "--no-metrics", "--force"], timeout=120)
    # the fake bundle has no model: loading it fails later, after the warning, for that reason
    assert "model/model.onnx: missing" in proc.stderr
    assert "warning: the bundle was built for" in proc.stderr
    assert "serving it anyway (--force)" in proc.stderr
