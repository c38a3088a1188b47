"""The three images: built offline, lean where it matters, the same CLI as on the host, and the
serve image answering Generate and health through published ports with its HEALTHCHECK and SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.containers.conftest import (
    IMAGES,
    PROMPT,
    VERSION,
    container,
    docker_cli,
    free_port,
    http_get,
    readable_copy,
    wait_serving,
)
from tests.serve.conftest import Reference

SERVE_SIZE_GOAL = 350_000_000  # bytes, uncompressed, without a bundle


def test_images_built_offline_with_labels(docker_client: Any, images: dict[str, Any]) -> None:
    sizes = {}
    for stage, image in images.items():
        assert IMAGES[stage] in image.tags
        labels = image.labels
        assert labels["io.slmops.stage"] == stage
        assert labels["org.opencontainers.image.version"] == VERSION
        config = image.attrs["Config"]
        assert config["User"] == "slmops", f"{stage} image must not run as root"
        assert config["Entrypoint"][-1].endswith("entrypoint.py")
        sizes[stage] = image.attrs["Size"]
    print("\nimage sizes (uncompressed): " + ", ".join(f"{s} {n / 1e6:.0f} MB" for s, n in sizes.items()))
    assert sizes["serve"] < SERVE_SIZE_GOAL, f"serve image is {sizes['serve'] / 1e6:.0f} MB (goal < 350 MB)"
    assert images["serve"].attrs["Config"]["Healthcheck"]["Test"][-1].endswith("healthcheck.py")


def test_serve_image_has_no_torch_transformers_peft_or_pip(docker_client: Any, images: dict[str, Any]) -> None:
    script = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
              "['torch', 'transformers', 'peft', 'pip', 'onnxruntime', 'grpc', 'slmops_serve']}))")
    out = docker_client.containers.run(IMAGES["serve"], entrypoint=["/opt/venv/bin/python", "-c", script],
                                       command=[], remove=True, network_disabled=True)
    found = json.loads(out)
    assert found == {"torch": False, "transformers": False, "peft": False, "pip": False,
                     "onnxruntime": True, "grpc": True, "slmops_serve": True}


@pytest.mark.parametrize("stage,command", [("train", "train"), ("build", "build"), ("build", "bundle"), ("serve", "serve")])
def test_images_run_the_host_cli(docker_client: Any, images: dict[str, Any], stage: str, command: str) -> None:
    out = docker_client.containers.run(IMAGES[stage], [command, "--help"], remove=True, network_disabled=True)
    assert f"Usage: slmops {command}" in out.decode()


def test_train_then_build_in_their_images(docker_client: Any, images: dict[str, Any], tiny_model_dir: Path,
                                          tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """`slmops train` in slmops-train and `slmops build` + `bundle verify` in slmops-build, on mounted folders."""
    work = tmp_path / "work"
    work.mkdir()
    user = f"{os.getuid()}:{os.getgid()}"
    mounts = {str(tiny_model_dir): {"bind": "/data/model", "mode": "ro"},
              str(tiny_data["tone_train"].parent): {"bind": "/data/text", "mode": "ro"},
              str(work): {"bind": "/work", "mode": "rw"}}
    start = time.monotonic()
    docker_client.containers.run(IMAGES["train"], [
        "train", "-m", "/data/model", "--data_files", "train=/data/text/tone_train.jsonl",
        "--data_files", "eval=/data/text/tone_eval.jsonl", "--eval_split", "eval", "--text_template",
        "Tone of: {phrase}\n{tone}", "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4",
        "--lora_alpha", "8", "--target_modules", "q_proj", "--target_modules", "v_proj", "--eval_generate_limit", "2",
        "--eval_max_new_tokens", "2", "--report_to", "none", "--no-progress", "-o", "runs/tone"],
        volumes=mounts, user=user, remove=True, network_disabled=True, init=True)
    trained = time.monotonic() - start
    run = json.loads((work / "runs" / "tone" / "run.json").read_text())
    assert (work / "runs" / "tone" / "adapter").is_dir() and run
    docker_client.containers.run(IMAGES["build"], [
        "build", "-m", "/data/model", "--adapter", "tone=runs/tone", "--precision", "fp32", "--no-validate",
        "-o", "dist/bundles/cpu"], volumes=mounts, user=user, remove=True, network_disabled=True, init=True)
    out = docker_client.containers.run(IMAGES["build"], ["bundle", "verify", "dist/bundles/cpu"], volumes=mounts,
                                       user=user, remove=True, network_disabled=True)
    bundle = json.loads((work / "dist" / "bundles" / "cpu" / "bundle.json").read_text())
    assert "tone" in bundle["adapters"]
    assert out, "bundle verify printed nothing"
    print(f"\ntrain in slmops-train {trained:.0f}s, build + verify in slmops-build {time.monotonic() - start - trained:.0f}s")


def test_serve_image_generate_health_metrics_sigterm(docker_client: Any, images: dict[str, Any],
                                                     serve_bundle: Path, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    bundle = readable_copy(serve_bundle, tmp_path / "bundle")
    start = time.monotonic()
    with container(docker_client, IMAGES["serve"], command=["serve", "/bundle", "--threads", "1"], init=True,
                   volumes={str(bundle): {"bind": "/bundle", "mode": "ro"}},
                   ports={"50051/tcp": ("127.0.0.1", port), "9090/tcp": ("127.0.0.1", metrics)}) as c:
        client = wait_serving(f"127.0.0.1:{port}", watch=c)
        serving = time.monotonic() - start
        with client:
            response = client.generate(PROMPT, adapter="tone", max_new_tokens=12)
            assert response.adapter == "tone" and response.text
            expected, _ = Reference(serve_bundle).generate(
                PROMPT, serve_bundle / "adapters" / "tone.onnx_adapter", max_new_tokens=12)
            assert response.text == expected, "the container must answer exactly like onnxruntime-genai on the host"
            # no --admin-token: admin calls through the published port (not loopback inside the
            # container) are refused, and answered from inside the container
            with pytest.raises(grpc.RpcError) as denied:
                client.list_adapters()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--admin-token" in denied.value.details()
        inside = c.exec_run(["/opt/venv/bin/python", "-c", "from slmops_serve.client import SlmopsClient; print(sorted("
                             "a.name for a in SlmopsClient('127.0.0.1:50051', token='').list_adapters()))"])
        assert inside.exit_code == 0 and b"'extract', 'tone'" in inside.output, inside.output
        assert "slmops" in http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert c.exec_run(["id", "-u"]).output.decode().strip() == "10001"
        probe = c.exec_run(["/opt/venv/bin/python", "/usr/local/lib/slmops/healthcheck.py", "-v"])
        assert probe.exit_code == 0 and b"SERVING" in probe.output
        # Docker's own HEALTHCHECK (first run one interval, 15 s, after start).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c.reload()
            if c.attrs["State"].get("Health", {}).get("Status") == "healthy":
                break
            time.sleep(1)
        assert c.attrs["State"]["Health"]["Status"] == "healthy", c.attrs["State"].get("Health")
        stop_start = time.monotonic()
        c.stop(timeout=30)
        stopped = time.monotonic() - stop_start
        c.reload()
        assert c.attrs["State"]["ExitCode"] == 0, c.logs(tail=20)
        assert stopped < 15, f"SIGTERM took {stopped:.1f}s: the server must drain and exit, not wait for SIGKILL"
    print(f"\nserve container: SERVING {serving:.1f}s after docker run; SIGTERM -> exit 0 in {stopped:.1f}s")


def test_serve_image_without_init_still_stops_on_sigterm(docker_client: Any, images: dict[str, Any],
                                                         serve_bundle: Path, tmp_path: Path) -> None:
    """Python as PID 1 (no --init): the server's own handler drains and exits 0."""
    port = free_port()
    bundle = readable_copy(serve_bundle, tmp_path / "bundle")
    with container(docker_client, IMAGES["serve"], command=["serve", "/bundle", "--no-metrics"],
                   volumes={str(bundle): {"bind": "/bundle", "mode": "ro"}},
                   ports={"50051/tcp": ("127.0.0.1", port)}) as c:
        wait_serving(f"127.0.0.1:{port}", watch=c).close()
        start = time.monotonic()
        c.stop(timeout=30)
        c.reload()
        assert c.attrs["State"]["ExitCode"] == 0
        assert time.monotonic() - start < 15


def test_save_load_round_trip(docker_client: Any, images: dict[str, Any], tmp_path: Path) -> None:
    """docker save / docker load (plain and gzip) of the serve image, on this engine: the loaded image has
    the same ID. (The load here finds its layers present; test_deploy_ssh times a load into an empty engine.)"""
    tag = f"slmops-serve-roundtrip:{VERSION}"
    images["serve"].tag(tag)
    archive = tmp_path / "serve.tar"
    cli = docker_cli()
    start = time.monotonic()
    subprocess.run([cli, "save", "-o", str(archive), tag], check=True)
    saved = time.monotonic() - start
    docker_client.images.remove(tag)
    start = time.monotonic()
    out = subprocess.run([cli, "load", "-i", str(archive)], check=True, capture_output=True, text=True).stdout
    loaded = time.monotonic() - start
    assert tag in out
    assert docker_client.images.get(tag).id == images["serve"].id
    gz = tmp_path / "serve.tar.gz"
    subprocess.run(f"gzip -1 -c {archive} > {gz}", shell=True, check=True)
    docker_client.images.remove(tag)
    subprocess.run([cli, "load", "-i", str(gz)], check=True, capture_output=True)
    assert docker_client.images.get(tag).id == images["serve"].id
    docker_client.images.remove(tag)
    print(f"\nsave/load serve image: {archive.stat().st_size / 1e6:.0f} MB tar ({gz.stat().st_size / 1e6:.0f} MB "
          f"gzip -1), save {saved:.1f}s, load {loaded:.1f}s")
