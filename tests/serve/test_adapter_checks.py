"""One .onnx_adapter check for every stage (slmops.contract.check_adapter_file): build validation,
`slmops bundle verify` and the server's LoadAdapter refuse the same files with the same words, and
take the same files with the same rank and modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BAD = ["garbage", "truncated", "wrong_names", "wrong_shape", "wrong_dtype", "half_pair"]


@pytest.mark.parametrize("case", BAD)
def test_build_verify_and_serve_refuse_the_same_files_with_the_same_problems(case: str, adapter_files: dict[str, Path],
                                                                            tiny_bundle: Path, tmp_path: Path) -> None:
    from slmops_build.bundle_cli import verify_bundle
    from slmops_build.validate import check_adapter_file as build_check
    from slmops_serve.errors import ServeError
    from slmops_serve.registry import check_adapter_file as serve_check

    from slmops import contract
    from slmops.bundle import read_manifest

    template = read_manifest(tiny_bundle).lora_template
    path = adapter_files[case]
    check = contract.check_adapter_file(path, template)
    assert check.problems and not check.ok
    assert build_check(path, template) == [f"{path.name}: {p}" for p in check.problems]
    with pytest.raises(ServeError) as exc:
        serve_check(path, template)
    assert exc.value.code == ("FAILED_PRECONDITION" if check.readable else "INVALID_ARGUMENT")
    assert check.problems[0] in str(exc.value)
    # a bundle whose adapter file is this one: verify names the same problem
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    shutil.copy(path, bundle / "adapters" / "tone.onnx_adapter")
    problems, _ = verify_bundle(bundle, load=False)
    assert f"adapter tone: {check.problems[0]}" in problems


@pytest.mark.parametrize("name", ["tone", "extract"])
def test_build_and_serve_take_the_bundle_adapters_alike(name: str, tiny_bundle: Path) -> None:
    from slmops_build.validate import check_adapter_file as build_check
    from slmops_serve.registry import check_adapter_file as serve_check

    from slmops import contract
    from slmops.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    path = tiny_bundle / manifest.adapters[name].file
    check = contract.check_adapter_file(path, manifest.lora_template)
    assert check.ok and build_check(path, manifest.lora_template) == []
    served = serve_check(path, manifest.lora_template)
    assert (served.rank, served.modules) == (check.rank, check.modules)
    assert (check.rank, check.modules) == (manifest.adapters[name].rank, manifest.adapters[name].target_modules)
