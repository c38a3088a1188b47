"""Deploy pieces that need no Docker engine: host parsing, the bundle tar stream, option errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from slmops.errors import SlmopsUsageError
from tests.containers.conftest import run_slmops

pytest.importorskip("docker", reason="the docker SDK (slmops[deploy]) is not installed")


@pytest.mark.parametrize("spec,kind", [("local", "local"), ("ssh://pi@edge-1", "ssh"), ("ssh://edge-1:2222", "ssh"),
                                       ("tcp://10.0.0.5:2375", "tcp"), ("unix:///run/docker.sock", "unix")])
def test_parse_host(spec: str, kind: str) -> None:
    from slmops_ops.deploy.hosts import parse_host

    assert parse_host(spec).kind == kind


@pytest.mark.parametrize("spec,hint", [("edge-1", "is not a Docker host"), ("pi@edge-1", "did you mean ssh://pi@edge-1"),
                                       ("http://edge-1", "is not a Docker host"), ("tcp://edge-1", "tcp://host:port")])
def test_parse_host_refuses(spec: str, hint: str) -> None:
    from slmops_ops.deploy.hosts import parse_host

    with pytest.raises(SlmopsUsageError) as info:
        parse_host(spec)
    assert info.value.option == "--host" and hint in info.value.message


def test_split_ref() -> None:
    from slmops_ops.deploy.transfer import split_ref

    assert split_ref("slmops-serve:0.1.0") == ("slmops-serve", "0.1.0")
    assert split_ref("127.0.0.1:5000/slmops-serve:0.1.0") == ("127.0.0.1:5000/slmops-serve", "0.1.0")
    assert split_ref("127.0.0.1:5000/slmops-serve") == ("127.0.0.1:5000/slmops-serve", "latest")


def test_tar_stream_round_trips(tmp_path: Path) -> None:
    from slmops_ops.deploy.transfer import tar_stream

    (tmp_path / "model").mkdir()
    files = {"bundle.json": b"{}", "model/model.onnx": bytes(range(256)) * 5000, "model/empty": b"",
             "adapters/a.onnx_adapter": b"x" * 513}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    blob = b"".join(tar_stream([(n, tmp_path / n) for n in files]))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, data in files.items():
            member = members[name]
            assert member.uid == 0 and member.mode == 0o644
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == data
        assert members["model"].isdir() and members["model"].mode == 0o755


def test_gzip_chunks() -> None:
    import gzip

    from slmops_ops.deploy.transfer import gzip_chunks

    data = [b"abc" * 1000, b"", b"xyz" * 5000]
    assert gzip.decompress(b"".join(gzip_chunks(data))) == b"".join(data)


def test_cli_bad_inputs_exit_2_naming_the_option(tmp_path: Path) -> None:
    cases = [
        (["deploy", "--host", "edge-1", "--bundle", str(tmp_path)], "--host"),
        (["deploy", "--host", "local", "--bundle", str(tmp_path / "missing")], "--bundle"),
        (["deploy", "--host", "local", "--bundle", str(tmp_path)], "--bundle"),  # no bundle.json
        (["deploy", "--bundle", str(tmp_path), "--port", "70000"], "--port"),
        (["deploy", "--bundle", str(tmp_path), "--port", "6000", "--metrics-port", "6000"], "--metrics-port"),
        (["deploy", "--bundle", str(tmp_path), "--registry", "not a registry"], "--registry"),
        (["deploy", "--bundle", str(tmp_path), "--env", "NOEQUALS"], "--env"),
        (["deploy", "--bundle", str(tmp_path), "--memory", "lots"], "--memory"),
        (["deploy", "--bundle", str(tmp_path), "--cpus", "0"], "--cpus"),
        (["deploy", "--bundle", str(tmp_path), "--log-max-size", "1x"], "--log-max-size"),
        (["deploy", "--bundle", str(tmp_path), "--log-max-files", "0"], "--log-max-files"),
    ]
    for args, option in cases:
        proc = run_slmops(args, env={"SLMOPS_DEPLOY_STATE": str(tmp_path / "s.json")}, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith(f"Error: {option}:"), (args, proc.stderr)


def test_corrupt_bundle_is_refused_before_anything_moves(tmp_path: Path) -> None:
    from slmops_ops.deploy.deployer import check_bundle

    bundle = tmp_path / "b"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "model.onnx").write_bytes(b"weights")
    manifest = {"schema_version": 1, "created_at": "x", "target": {"name": "cpu", "execution_provider": "cpu",
                "precision": "fp32", "adapter_dtype": "float32"},
                "base_model": {"name": "m", "source": "s", "sha256": "0"}, "files": {"model/model.onnx": "0" * 64},
                "lora_template": {"abi_version": 3, "modules": [], "num_layers": 0, "dtype": "float32", "inputs": []}}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(SlmopsUsageError) as info:
        check_bundle(bundle)
    assert info.value.option == "--bundle" and "sha256 mismatch" in info.value.message



def test_bundle_arch_refusal_names_the_target_to_build(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from slmops_ops.deploy.deployer import check_bundle_arch
    from slmops_ops.deploy.hosts import parse_host

    host = parse_host("local")
    manifest = SimpleNamespace(target=SimpleNamespace(name="cpu", arch="amd64"))
    check_bundle_arch(tmp_path, manifest, "amd64", host)  # type: ignore[arg-type]
    with pytest.raises(SlmopsUsageError) as err:
        check_bundle_arch(tmp_path, manifest, "arm64", host)  # type: ignore[arg-type]
    assert err.value.option == "--bundle" and "--target cpu-arm64" in err.value.message
    assert "was built for amd64 (target cpu)" in err.value.message
    # a cpu-arm64 bundle beside it (dist/bundles/cpu and dist/bundles/cpu-arm64): named, not rebuilt
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu-arm64").mkdir()
    (tmp_path / "cpu-arm64" / "bundle.json").write_text("{}")
    with pytest.raises(SlmopsUsageError) as err:
        check_bundle_arch(tmp_path / "cpu", manifest, "arm64", host)  # type: ignore[arg-type]
    assert f"pass --bundle {tmp_path / 'cpu-arm64'}" in err.value.message


def test_each_deployment_gets_an_admin_token_kept_in_a_0600_state_file(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat
    from types import SimpleNamespace

    from slmops_ops.deploy.deployer import (
        ADMIN_TOKEN_ENV,
        admin_token,
        container_token,
        record,
        recorded_token,
    )
    from slmops_ops.deploy.hosts import parse_host

    state = tmp_path / "state" / "deployments.json"
    monkeypatch.setenv("SLMOPS_DEPLOY_STATE", str(state))
    host = parse_host("ssh://pi@edge-1")
    # nothing known: a new random token, different for each deployment
    first, source = admin_token(host, "serve-a", None, {})
    second, _ = admin_token(host, "serve-b", None, {})
    assert source == "generated" and len(first) >= 40 and first != second
    assert record(host, "serve-a", "slmops-serve:x", "cpu@abc", first)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert recorded_token(host, "serve-a") == first and recorded_token(host, "serve-b") is None
    # a redeploy keeps it (clients holding it keep working); a record without a token keeps it too
    assert admin_token(host, "serve-a", None, {}) == (first, "kept")
    assert record(host, "serve-a", "slmops-serve:y", "cpu@def")
    assert recorded_token(host, "serve-a") == first
    # a state file that became world-readable is written back 0600
    os.chmod(state, 0o644)
    assert record(host, "serve-a", "slmops-serve:y", "cpu@def", first)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    # --env SLMOPS_ADMIN_TOKEN wins; a running container's token is kept when this machine has none
    assert admin_token(host, "serve-a", None, {ADMIN_TOKEN_ENV: "mine"}) == ("mine", "--env")
    running = SimpleNamespace(attrs={"Config": {"Env": ["PATH=/opt/venv/bin", f"{ADMIN_TOKEN_ENV}=from-container"]}})
    assert container_token(running) == "from-container"
    assert admin_token(host, "serve-c", running, {}) == ("from-container", "kept")
    # `slmops deploy token` prints it; an unknown deployment names the option
    proc = run_slmops(["deploy", "token", "--host", "ssh://pi@edge-1", "--name", "serve-a"],
                      env={"SLMOPS_DEPLOY_STATE": str(state)}, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == first, proc.stderr
    proc = run_slmops(["deploy", "token", "--host", "ssh://pi@edge-1", "--name", "nope"],
                      env={"SLMOPS_DEPLOY_STATE": str(state)}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --name:"), proc.stderr
