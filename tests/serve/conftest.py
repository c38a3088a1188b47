"""Serve-stage fixtures: one real tiny bundle (fp32, two trained adapters, no validation) built once
per session by the build stage's ``build_bundle``, a real gRPC server on free ports, crafted
adapter files (good, corrupt, built for another ABI), and direct onnxruntime-genai references."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.og_reference import OgReference
from slmops.contract import read_adapter_tensors, write_adapter_tensors

ADMIN_TOKEN = "test-admin-token"
MAX_UPLOAD = 200_000  # bytes; the extract adapter (~70 kB) fits, a 300 kB upload does not
PROMPT = "Tone of: I lost my keys again\n"


@pytest.fixture(scope="session")
def adapter_files(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server's --adapter-dir: copies of the bundle's adapters plus files that must be refused."""
    import numpy as np

    root = tmp_path_factory.mktemp("adapter-dir")
    tone = shutil.copy(tiny_bundle / "adapters" / "tone.onnx_adapter", root / "tone.onnx_adapter")
    extract = shutil.copy(tiny_bundle / "adapters" / "extract.onnx_adapter", root / "extract.onnx_adapter")
    arrays = read_adapter_tensors(Path(tone))
    files = {"tone": Path(tone), "extract": Path(extract)}
    files["garbage"] = root / "garbage.onnx_adapter"
    files["garbage"].write_bytes(b"this is not an adapter" * 10)
    data = Path(tone).read_bytes()
    files["truncated"] = root / "truncated.onnx_adapter"
    files["truncated"].write_bytes(data[: len(data) // 2])
    renamed = {k.replace("layers.0.", "layers.7."): v for k, v in arrays.items()}
    files["wrong_names"] = write_adapter_tensors(renamed, root / "wrong_names.onnx_adapter")
    reshaped = {k: (np.zeros((v.shape[0] + 3, v.shape[1]), v.dtype) if ".lora_A." in k else v) for k, v in arrays.items()}
    files["wrong_shape"] = write_adapter_tensors(reshaped, root / "wrong_shape.onnx_adapter")
    files["wrong_dtype"] = write_adapter_tensors({k: v.astype("float16") for k, v in arrays.items()}, root / "wrong_dtype.onnx_adapter")
    files["half_pair"] = write_adapter_tensors({k: v for k, v in arrays.items() if ".lora_B." not in k}, root / "half_pair.onnx_adapter")
    files["not_adapter_suffix"] = root / "tone.bin"
    files["not_adapter_suffix"].write_bytes(data)
    return files


def make_config(bundle: Path, **overrides: Any) -> Any:
    from slmops_serve.config import ServeConfig

    values: dict[str, Any] = dict(
        bundle_dir=str(bundle), host="127.0.0.1", port=0, metrics_port=0, threads=1, max_batch=2, max_queue=8,
        admin_token=ADMIN_TOKEN, max_upload_bytes=MAX_UPLOAD, default_max_new_tokens=16, max_new_tokens_limit=512,
        unload_drain_timeout_s=10.0, grace_period_s=10.0,
    )
    values.update(overrides)
    return ServeConfig(**values)


@contextlib.contextmanager
def running_server(bundle: Path, **overrides: Any) -> Iterator[Any]:
    """An in-process SlmopsServer on free ports, loaded and SERVING; stopped (drained) on exit."""
    from slmops_serve.server import SlmopsServer

    server = SlmopsServer(make_config(bundle, **overrides))
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop(grace=5)


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, key): a self-signed one for localhost and 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="session")
def server(tiny_bundle: Path, adapter_files: dict[str, Path]) -> Iterator[Any]:
    """The shared server: batches of 2, queue 8, admin token, --adapter-dir = adapter_files' folder."""
    with running_server(tiny_bundle, adapter_dir=str(adapter_files["tone"].parent)) as srv:
        yield srv


@pytest.fixture
def client(server: Any) -> Iterator[Any]:
    from slmops_serve.client import SlmopsClient

    with SlmopsClient(server.address, token=ADMIN_TOKEN, timeout=60) as c:
        yield c


class Gate:
    """Holds generations in flight: ``engine.token_hook`` blocks every step until ``open()``."""

    def __init__(self, engine: Any, after_tokens: int = 1) -> None:
        self.engine = engine
        self.after_tokens = after_tokens
        self._open = threading.Event()
        self.waiting = threading.Semaphore(0)  # released once per request that reached the gate

    def hook(self, gen: Any, produced: int) -> None:
        if produced == self.after_tokens and not self._open.is_set():
            self.waiting.release()
            self._open.wait(30)

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> None:
        for _ in range(n):
            assert self.waiting.acquire(timeout=timeout), "no generation reached the gate"

    def open(self) -> None:
        self._open.set()

    def __enter__(self) -> Gate:
        self.engine.token_hook = self.hook
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
        self.engine.token_hook = None


@pytest.fixture
def gate(server: Any) -> Iterator[Callable[..., Gate]]:
    gates: list[Gate] = []

    def make(after_tokens: int = 1) -> Gate:
        g = Gate(server.engine, after_tokens)
        gates.append(g)
        return g

    yield make
    for g in gates:
        g.__exit__()


class Reference(OgReference):
    """onnxruntime-genai driving the bundle directly (no server, one thread): the independent oracle
    every served greedy answer must equal (bench/og_reference.py says why it is og)."""

    def __init__(self, bundle: Path) -> None:
        super().__init__(bundle / "model", threads=1)


@pytest.fixture(scope="session")
def reference(tiny_bundle: Path) -> Reference:
    return Reference(tiny_bundle)
