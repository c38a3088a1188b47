"""`slmops generate`, `slmops adapters list|load|unload` against a live server, and `slmops serve`
usage errors (exit 2, one line naming the option)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import ADMIN_TOKEN, PROMPT


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from slmops.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_unary_stream_and_json(server: Any, client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    want = client.generate(PROMPT, adapter="extract", max_new_tokens=8).text
    code, out, _ = run(["generate", "--server", server.address, "--adapter", "extract", "--max-new-tokens", "8", PROMPT], capsys)
    assert code == 0 and out == want + "\n"
    code, out, err = run(["generate", "--server", server.address, "--adapter", "extract", "--max-new-tokens", "8",
                          "--stream", PROMPT], capsys)
    assert code == 0 and out == want + "\n" and "8 tokens" in err
    code, out, _ = run(["generate", "--server", server.address, "--adapter", "extract", "--max-new-tokens", "8",
                        "--json", PROMPT], capsys)
    response = json.loads(out)
    assert code == 0 and response["text"] == want and response["adapter"] == "extract"
    assert response["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")


def test_generate_errors_name_the_problem(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["generate", "--server", server.address, "--adapter", "nope", "hi"], capsys)
    assert code == 1 and "NOT_FOUND: adapter: 'nope' is not loaded" in err
    code, _, err = run(["generate", "--server", server.address, "--top-p", "2", "hi"], capsys)
    assert code == 1 and "INVALID_ARGUMENT: top_p:" in err
    code, _, err = run(["generate", "--server", "127.0.0.1:1", "--timeout", "3", "hi"], capsys)
    assert code == 1 and "cannot reach the server at 127.0.0.1:1" in err


def test_adapters_list_load_unload(server: Any, adapter_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--server", server.address, "--token", ADMIN_TOKEN]
    code, out, _ = run(["adapters", "list", *common], capsys)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "SHA256", "SOURCE"] and "tone" in out
    code, out, _ = run(["adapters", "load", "cli-upload", str(adapter_files["extract"]), *common], capsys)
    assert code == 0 and "cli-upload: loaded" in out
    code, out, _ = run(["adapters", "load", "cli-upload", "tone.onnx_adapter", "--remote", *common], capsys)
    assert code == 0 and "cli-upload: replaced" in out
    code, out, _ = run(["adapters", "list", "--json", *common], capsys)
    assert code == 0 and "cli-upload" in {a["name"] for a in json.loads(out)}
    code, out, _ = run(["adapters", "unload", "cli-upload", *common], capsys)
    assert code == 0 and "cli-upload: unloaded" in out and "drained" in out
    code, _, err = run(["adapters", "list", "--server", server.address, "--token", "bad"], capsys)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _, err = run(["adapters", "load", "x", "/no/such/file.onnx_adapter", *common], capsys)
    assert code == 2 and "PATH" in err


@pytest.mark.parametrize("args,option", [
    (["serve"], "BUNDLE_DIR"),
    (["serve", "/no/such/bundle"], "BUNDLE_DIR"),
    (["serve", "{bundle}", "--max-batch", "0"], "--max-batch"),
    (["serve", "{bundle}", "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], "--tls-cert"),
    (["serve", "{bundle}", "--tls-cert", "{bundle}/bundle.json"], "--tls-cert"),
    (["serve", "{bundle}", "--default-max-new-tokens", "99", "--max-new-tokens-limit", "10"], "--default-max-new-tokens"),
    (["serve", "{tmp}"], "BUNDLE_DIR"),
])
def test_serve_usage_errors_exit_2(args: list[str], option: str, tiny_bundle: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(bundle=tiny_bundle, tmp=tmp_path) for a in args]
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert err.startswith(f"Error: {option}: "), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("abi,why", [(1, "packs them per fused projection"), (2, "no per-row LoRA masks")])
def test_a_bundle_of_an_old_adapter_abi_is_refused_by_name(tiny_bundle: Path, tmp_path: Path, abi: int, why: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """ABI 1 (one LoRA pair per module) and ABI 2 (no row masks) bundles are refused with what changed and the fix."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "bundle.json").read_text())
    manifest["lora_template"]["abi_version"] = abi
    (old / "bundle.json").write_text(json.dumps(manifest))
    code, _, err = run(["serve", str(old)], capsys)
    assert code == 2, err
    assert f"adapter ABI version {abi} is not supported" in err and why in err
    assert "rebuild the bundle with `slmops build`" in err


def test_serve_reads_a_yaml_config(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"bundle_dir: {tiny_bundle}\nmax_batch: 0\n")
    code, _, err = run(["serve", "-c", str(config)], capsys)
    assert code == 2 and err.startswith("Error: --max-batch: "), err
