"""One adapter name rule for every stage (slmops.contract): `slmops build --adapter NAME=PATH`,
bundle.json, and the server's LoadAdapter take or refuse the same names. Before, build took any
``\\w`` name of any length and the server ASCII of at most 64, so ``tön`` built, verified, and then
`slmops serve` refused the bundle at start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.serve.test_cli import run

# name -> valid under the contract's rule (ASCII letters/digits/._-, starts with one of the first two, 1-64)
NAMES = {
    "tone2": True,  # not a name of the shared server's bundle: this test unloads what it loads
    "Tone.v2_a-b": True,
    "a" * 64: True,
    "9lives": True,
    "tön": False,  # a \w letter, not ASCII: the name build used to take
    "a" * 65: False,
    "-lead": False,
    ".hidden": False,
    "two words": False,
    "日本": False,
}


@pytest.mark.parametrize("name,valid", list(NAMES.items()), ids=[n[:12] for n in NAMES])
def test_build_and_serve_take_and_refuse_the_same_names(name: str, valid: bool, tiny_runs: dict[str, Path],
                                                         client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from slmops.contract import adapter_name_problem

    assert (adapter_name_problem(name) is None) == valid
    # build: the CLI's --adapter NAME=PATH (a refused name exits 2 before any work)
    if valid:
        from slmops_build.build import BuildConfig

        config = BuildConfig(adapters=[f"{name}={tiny_runs['tone']}"], validate_bundle=False)
        assert list(config.adapters) == [name]
    else:
        code, _, err = run(["build", "--adapter", f"{name}={tiny_runs['tone']}", "--no-validate"], capsys)
        assert code == 2, err
        assert err.startswith("Error: --adapter: ") and len(err.strip().splitlines()) == 1, err
        assert adapter_name_problem(name) in err
    # serve: LoadAdapter under that name
    if valid:
        client.load_adapter(name, path="tone.onnx_adapter")
        client.unload_adapter(name)
    else:
        with pytest.raises(grpc.RpcError) as exc:
            client.load_adapter(name, path="tone.onnx_adapter")
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == f"name: {adapter_name_problem(name)}"


def test_a_bundle_json_with_a_bad_adapter_name_is_refused_by_serve_and_verify(
        tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited bundle.json: `slmops serve` exits 2 naming the field and the fix, and so does
    `slmops bundle verify` (one line each)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["adapters"]["tön"] = manifest["adapters"].pop("tone")
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    code, _, err = run(["serve", str(bundle)], capsys)
    assert code == 2, err
    assert "adapters: 'tön' is not a valid adapter name; use 1-64 ASCII letters" in err and "slmops build" in err
    assert len(err.strip().splitlines()) == 1, err
    code, out, err = run(["bundle", "verify", "--no-load", str(bundle)], capsys)
    assert code == 1 and "'tön' is not a valid adapter name" in out + err
