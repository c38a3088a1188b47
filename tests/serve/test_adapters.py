"""Adapter lifecycle on a running server: list, load (path or upload), atomic replace with requests
in flight, drained unload, refused loads that change nothing, hot swaps under 8 live streams, --watch."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from slmops.v1 import generation_pb2
from tests.serve.conftest import ADMIN_TOKEN, MAX_UPLOAD, PROMPT, running_server


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaded(client: Any) -> dict[str, str]:
    return {a.name: a.sha256 for a in client.list_adapters()}


def test_list_adapters_shows_the_bundle_adapters(client: Any, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    adapters = {a.name: a for a in client.list_adapters()}
    for name in ("tone", "extract"):
        info = adapters[name]
        assert info.sha256 == manifest["adapters"][name]["sha256"]
        assert info.source == "bundle" and info.rank == manifest["adapters"][name]["rank"]
        assert sorted(info.target_modules) == sorted(manifest["adapters"][name]["target_modules"])
        assert info.size_bytes > 0 and info.loaded_at > 0


def test_load_from_the_adapter_dir_and_from_upload(client: Any, adapter_files: dict[str, Path], reference: Any) -> None:
    try:
        by_path = client.load_adapter("by-path", path="extract.onnx_adapter", sha256=sha(adapter_files["extract"]))
        assert (by_path.replaced, by_path.unchanged, by_path.adapter.source) == (False, False, "path")
        by_abs = client.load_adapter("by-abs-path", path=str(adapter_files["tone"]))
        assert by_abs.adapter.sha256 == sha(adapter_files["tone"])
        upload = client.upload_adapter("by-upload", adapter_files["extract"])
        assert upload.adapter.source == "upload" and upload.adapter.sha256 == sha(adapter_files["extract"])
        again = client.upload_adapter("by-upload", adapter_files["extract"])
        assert again.unchanged and not again.replaced
        want = reference.generate(PROMPT, adapter_files["extract"], 12)[0]
        for name in ("by-path", "by-upload"):
            response = client.generate(PROMPT, adapter=name, max_new_tokens=12)
            assert response.text == want and response.adapter_sha256 == sha(adapter_files["extract"])
    finally:
        for name in ("by-path", "by-abs-path", "by-upload"):
            client.unload_adapter(name)
    assert not {"by-path", "by-abs-path", "by-upload"} & set(loaded(client))


def test_load_adapter_replaces_existing_atomically(client: Any, server: Any, gate: Any, adapter_files: dict[str, Path],
                                                   reference: Any) -> None:
    old_file, new_file = adapter_files["tone"], adapter_files["extract"]
    old_text = reference.generate(PROMPT, old_file, 12)[0]
    new_text = reference.generate(PROMPT, new_file, 12)[0]
    assert old_text != new_text
    client.load_adapter("swap", path=old_file.name)
    try:
        with gate(after_tokens=1) as g, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.generate, PROMPT, adapter="swap", max_new_tokens=12)
            g.wait_for(1)  # the request holds the old version and has generated one token
            replaced = client.load_adapter("swap", path=new_file.name)
            assert replaced.replaced and replaced.previous_sha256 == sha(old_file)
            assert loaded(client)["swap"] == sha(new_file)
            assert server.engine.registry.retired_count() == 1  # the old version waits for its request
            g.open()
            old = in_flight.result(timeout=30)
        new = client.generate(PROMPT, adapter="swap", max_new_tokens=12)
        assert (old.text, old.adapter_sha256) == (old_text, sha(old_file))
        assert (new.text, new.adapter_sha256) == (new_text, sha(new_file))
        assert server.engine.registry.retired_count() == 0  # freed in onnxruntime-genai once its request ended
    finally:
        client.unload_adapter("swap")


def test_unload_drains_in_flight_requests_first(client: Any, server: Any, gate: Any, adapter_files: dict[str, Path]) -> None:
    client.load_adapter("drain-me", path="tone.onnx_adapter")
    with gate(after_tokens=1) as g, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(client.generate, PROMPT, adapter="drain-me", max_new_tokens=8)
        g.wait_for(1)
        unload = pool.submit(client.unload_adapter, "drain-me")
        time.sleep(0.3)
        assert not unload.done(), "unload must wait for the request in flight"
        with pytest.raises(grpc.RpcError) as exc:
            client.generate(PROMPT, adapter="drain-me", max_new_tokens=2)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # new requests are refused at once
        assert "drain-me" not in loaded(client)
        g.open()
        response = in_flight.result(timeout=30)
        result = unload.result(timeout=30)
    assert response.usage.completion_tokens == 8 and response.adapter == "drain-me"
    assert result.drained and result.sha256 == sha(adapter_files["tone"])
    assert server.engine.registry.retired_count() == 0


@pytest.mark.parametrize("case,code,field", [
    ("garbage", "INVALID_ARGUMENT", "path"),
    ("truncated", "INVALID_ARGUMENT", "path"),
    ("wrong_names", "FAILED_PRECONDITION", "path"),
    ("wrong_shape", "FAILED_PRECONDITION", "path"),
    ("wrong_dtype", "FAILED_PRECONDITION", "path"),
    ("half_pair", "FAILED_PRECONDITION", "path"),
    ("not_adapter_suffix", "INVALID_ARGUMENT", "path"),
    ("checksum", "FAILED_PRECONDITION", "sha256"),
    ("upload_checksum", "FAILED_PRECONDITION", "sha256"),
    ("upload_garbage", "INVALID_ARGUMENT", "data"),
    ("upload_wrong_names", "FAILED_PRECONDITION", "data"),
    ("upload_oversized", "INVALID_ARGUMENT", "data"),
    ("outside_dir", "PERMISSION_DENIED", "path"),
    ("outside_dir_absolute", "PERMISSION_DENIED", "path"),
    ("missing_file", "NOT_FOUND", "path"),
    ("bad_name", "INVALID_ARGUMENT", "name"),
    ("bad_sha256", "INVALID_ARGUMENT", "sha256"),
    ("no_source", "INVALID_ARGUMENT", "path"),
])
def test_failed_load_leaves_the_loaded_set_unchanged(client: Any, adapter_files: dict[str, Path], tiny_bundle: Path,
                                                     case: str, code: str, field: str) -> None:
    before = loaded(client)
    tone_before = client.generate(PROMPT, adapter="tone", max_new_tokens=6)
    name = "tone"  # every attempt tries to REPLACE a loaded adapter
    attempts: dict[str, dict[str, Any]] = {
        "checksum": dict(path="tone.onnx_adapter", sha256="0" * 64),
        "upload_checksum": dict(data=adapter_files["extract"].read_bytes(), sha256="f" * 64),
        "upload_garbage": dict(data=b"\x00garbage" * 100),
        "upload_wrong_names": dict(data=adapter_files["wrong_names"].read_bytes()),
        "upload_oversized": dict(data=b"\x00" * (MAX_UPLOAD + 1)),
        "outside_dir": dict(path="../" * 3 + "etc/passwd.onnx_adapter"),
        "outside_dir_absolute": dict(path=str(tiny_bundle / "adapters" / "extract.onnx_adapter")),
        "missing_file": dict(path="nope.onnx_adapter"),
        "bad_name": dict(path="tone.onnx_adapter"),
        "bad_sha256": dict(path="tone.onnx_adapter", sha256="xyz"),
        "no_source": dict(),
    }
    kwargs = attempts.get(case, dict(path=adapter_files.get(case, Path("x")).name))
    if case == "bad_name":
        name = "../tone"
    with pytest.raises(grpc.RpcError) as exc:
        client.load_adapter(name, **kwargs)
    assert exc.value.code() == getattr(grpc.StatusCode, code), exc.value.details()
    assert exc.value.details().startswith(f"{field}: "), exc.value.details()
    assert loaded(client) == before
    tone_after = client.generate(PROMPT, adapter="tone", max_new_tokens=6)
    assert (tone_after.text, tone_after.adapter_sha256) == (tone_before.text, tone_before.adapter_sha256)


def test_upload_in_pieces_and_its_refusals(client: Any, server: Any, adapter_files: dict[str, Path], reference: Any) -> None:
    """UploadAdapter: a file sent in 10 kB pieces loads the same bytes; a wrong size, a stream that
    ends early, a second name or a wrong checksum is refused naming the field, and changes nothing."""
    from slmops.v1 import adapters_pb2

    path = adapter_files["extract"]
    try:
        response = client.upload_adapter("pieces", path, sha256=sha(path), chunk_bytes=10_000)
        assert response.adapter.source == "upload" and response.adapter.sha256 == sha(path)
        assert response.adapter.size_bytes == path.stat().st_size
        want = reference.generate(PROMPT, path, 12)[0]
        assert client.generate(PROMPT, adapter="pieces", max_new_tokens=12).text == want
    finally:
        client.unload_adapter("pieces")
    data = path.read_bytes()
    before = loaded(client)
    Chunk = adapters_pb2.UploadAdapterChunk
    cases = {
        "size": [Chunk(name="big", size=MAX_UPLOAD + 1, data=data[:100])],
        "data": [Chunk(name="short", size=len(data), data=data[:1000]), Chunk(data=data[1000:2000])],
        "name": [Chunk(name="two", size=len(data), data=data[:1000]), Chunk(name="other", data=data[1000:])],
        "sha256": [Chunk(name="sum", size=len(data), sha256="0" * 64, data=data)],
    }
    for field, chunks in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            client.adapters.UploadAdapter(iter(chunks), timeout=30, metadata=client._admin_metadata())
        assert exc.value.details().startswith(f"{field}: "), exc.value.details()
        code = grpc.StatusCode.FAILED_PRECONDITION if field == "sha256" else grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.code() == code, exc.value.details()
    assert loaded(client) == before
    samples = {(s.labels.get("method"), s.labels.get("code")): s.value for m in server.metrics.registry.collect()
               for s in m.samples if s.name == "slmops_requests_total"}
    assert samples[("UploadAdapter", "INVALID_ARGUMENT")] >= 3 and samples[("UploadAdapter", "OK")] >= 1


def test_abi_mismatch_message_names_the_tensor(client: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        client.load_adapter("x", path="wrong_names.onnx_adapter")
    assert "adapter ABI mismatch" in exc.value.details() and "model.layers.7" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        client.load_adapter("x", path="wrong_dtype.onnx_adapter")
    assert "float16" in exc.value.details() and "float32" in exc.value.details()


def test_unload_unknown_adapter_is_not_found(client: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        client.unload_adapter("never-loaded")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and exc.value.details().startswith("name: ")


def test_load_replace_unload_while_8_streams_run_loses_no_request(client: Any, server: Any, adapter_files: dict[str, Path],
                                                                  reference: Any, tiny_bundle: Path) -> None:
    """8 client threads stream over base/tone/extract/hot while an operator replaces `hot` back and forth
    and loads/unloads `temp`: every stream must finish, with the text of the version it reports."""
    files = {sha(adapter_files["tone"]): adapter_files["tone"], sha(adapter_files["extract"]): adapter_files["extract"]}
    expected = {"": reference.generate(PROMPT, None, 24)[0]}
    expected.update({s: reference.generate(PROMPT, f, 24)[0] for s, f in files.items()})
    client.load_adapter("hot", path="tone.onnx_adapter")
    stop = threading.Event()
    swaps = {"replace": 0, "temp": 0}

    def operator() -> None:
        names = ["extract.onnx_adapter", "tone.onnx_adapter"]
        while not stop.is_set():
            client.load_adapter("hot", path=names[swaps["replace"] % 2])
            swaps["replace"] += 1
            client.load_adapter("temp", path="extract.onnx_adapter")
            client.unload_adapter("temp")
            swaps["temp"] += 1

    def streamer(i: int) -> list[tuple[str, str, int]]:
        out = []
        for round_ in range(4):
            adapter = ["", "tone", "extract", "hot"][(i + round_) % 4]
            chunks = list(client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=24))
            out.append((adapter, "".join(c.text for c in chunks), chunks[-1].finish_reason))
            shas = {c.adapter_sha256 for c in chunks}
            assert len(shas) == 1, "one request, one adapter version"
            sha_used = shas.pop()
            assert "".join(c.text for c in chunks) == expected[sha_used], (adapter, sha_used[:8])
        return out

    try:
        admin = threading.Thread(target=operator)
        admin.start()
        with ThreadPoolExecutor(8) as pool:
            results = [r for f in [pool.submit(streamer, i) for i in range(8)] for r in f.result(timeout=120)]
        stop.set()
        admin.join(30)
    finally:
        stop.set()
        client.unload_adapter("hot")
    assert len(results) == 32
    assert all(reason != generation_pb2.FINISH_REASON_UNSPECIFIED for _, _, reason in results)
    assert swaps["replace"] >= 2, swaps
    assert server.engine.registry.retired_count() == 0
    assert server.engine.admitted == 0
    assert set(loaded(client)) == {"tone", "extract"}


def test_watch_loads_replaces_and_unloads_dropped_files(tiny_bundle: Path, adapter_files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from slmops_serve.client import SlmopsClient

    watched = tmp_path / "watched"
    watched.mkdir()
    with running_server(tiny_bundle, adapter_dir=str(watched), watch=True, watch_interval_s=0.1) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN) as c:

        def wait_until(check: Any, timeout: float = 10.0) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, loaded(c)
                time.sleep(0.05)

        shutil.copy(adapter_files["tone"], watched / "dropped.onnx_adapter")
        wait_until(lambda: loaded(c).get("dropped") == sha(adapter_files["tone"]))
        assert c.generate(PROMPT, adapter="dropped", max_new_tokens=2).adapter_sha256 == sha(adapter_files["tone"])
        shutil.copy(adapter_files["garbage"], watched / "broken.onnx_adapter")  # refused, logged, no harm
        tmp = watched / "dropped.tmp"
        shutil.copy(adapter_files["extract"], tmp)
        tmp.replace(watched / "dropped.onnx_adapter")
        wait_until(lambda: loaded(c).get("dropped") == sha(adapter_files["extract"]))
        (watched / "dropped.onnx_adapter").unlink()
        wait_until(lambda: "dropped" not in loaded(c))
        assert "broken" not in loaded(c)


def test_a_merged_bundle_refuses_runtime_adapters(adapter_files: dict[str, Path]) -> None:
    from slmops_serve.errors import ServeError
    from slmops_serve.registry import check_adapter_file

    from slmops.bundle import LoraTemplate

    merged = LoraTemplate(modules=[], num_layers=2, dtype="float32", inputs=[])
    with pytest.raises(ServeError) as exc:
        check_adapter_file(adapter_files["tone"], merged)
    assert exc.value.code == "FAILED_PRECONDITION" and "merged" in str(exc.value)


def test_unexpected_errors_get_a_status_and_are_counted(client: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError inside LoadAdapter is UNAVAILABLE for the client and in the metrics, not OK/UNKNOWN."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(server.engine.registry, "load", broken)
    with pytest.raises(grpc.RpcError) as exc:
        client.load_adapter("io-error", path="tone.onnx_adapter")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "I/O error" in exc.value.details()
    samples = {(s.labels.get("method"), s.labels.get("code")): s.value for m in server.metrics.registry.collect()
               for s in m.samples if s.name == "slmops_requests_total"}
    assert samples.get(("LoadAdapter", "UNAVAILABLE"), 0) >= 1


def test_a_refused_upload_is_named_for_the_user_and_leaves_no_file(client: Any, server: Any) -> None:
    registry = server.engine.registry
    with pytest.raises(grpc.RpcError) as exc:
        client.load_adapter("junk", data=b"not an adapter at all" * 8)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "upload for 'junk'" in exc.value.details() and "slmops-uploads" not in exc.value.details()
    # uploads are checked and loaded from the received bytes: no file is written, none is left
    assert "junk" not in registry.names() and not [n for n in registry.store.names() if n.startswith("junk@")]


def metric_samples(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in server.metrics.registry.collect()
            for s in m.samples}


def test_a_failed_unload_is_retried_counted_and_freed(server: Any, client: Any, adapter_files: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's unload fails once (injected): the version stays pending in the metrics, a timer
    retries it, and then it is gone from memory; the public loaded set was right all along."""
    from slmops_serve import registry as registry_module

    registry, store = server.engine.registry, server.engine.store
    monkeypatch.setattr(registry_module, "UNLOAD_RETRY_DELAYS_S", (0.3, 0.3))
    real_unload, calls = store.unload, []

    def flaky(internal: str) -> None:
        calls.append(internal)
        if len(calls) == 1:
            raise RuntimeError("injected: the store could not free the adapter")
        real_unload(internal)

    client.load_adapter("flaky", path="extract.onnx_adapter")
    internal = registry.get("flaky").internal
    before = metric_samples(server).get(("slmops_adapter_unload_failures_total", (("adapter", "flaky"),)), 0.0)
    monkeypatch.setattr(store, "unload", flaky)
    client.unload_adapter("flaky")
    assert "flaky" not in loaded(client) and "flaky" not in registry.names()  # gone for requests at once
    assert internal in store.names() and [e.internal for e in registry.pending_unloads()] == [internal]
    samples = metric_samples(server)
    assert samples[("slmops_adapter_unload_failures_total", (("adapter", "flaky"),))] == before + 1
    assert samples[("slmops_adapter_unloads_pending", ())] == 1
    assert ("slmops_adapter_loaded", (("adapter", "flaky"), ("sha256", sha(adapter_files["extract"])))) not in samples
    deadline = time.monotonic() + 10
    while registry.pending_unloads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls == [internal, internal]  # retried once, by the timer
    assert registry.pending_unloads() == [] and internal not in store.names()
    assert metric_samples(server)[("slmops_adapter_unloads_pending", ())] == 0
    assert client.generate(PROMPT, adapter="tone", max_new_tokens=4).adapter == "tone"  # the server goes on


def test_a_failed_unload_is_given_up_after_its_retries(server: Any, client: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops_serve import registry as registry_module

    registry, store = server.engine.registry, server.engine.store
    monkeypatch.setattr(registry_module, "UNLOAD_RETRY_DELAYS_S", (0.1, 0.1))
    real_unload, calls = store.unload, []

    def broken(internal: str) -> None:
        calls.append(internal)
        raise RuntimeError("injected: never frees")

    client.load_adapter("stuck", path="tone.onnx_adapter")
    internal = registry.get("stuck").internal
    monkeypatch.setattr(store, "unload", broken)
    client.unload_adapter("stuck")
    time.sleep(1.0)
    assert calls == [internal] * 3  # the first try and 2 retries, then no more (bounded)
    assert [e.internal for e in registry.pending_unloads()] == [internal]
    assert metric_samples(server)[("slmops_adapter_unloads_pending", ())] == 1
    # clean up: free it for real so the shared server's counts stay right
    monkeypatch.setattr(store, "unload", real_unload)
    registry._free(registry.pending_unloads()[0])
    assert registry.pending_unloads() == [] and internal not in store.names()
    assert metric_samples(server)[("slmops_adapter_unloads_pending", ())] == 0


def test_adapter_metrics_stay_right_when_a_watcher_load_races_an_api_unload(server: Any, client: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher thread loads while an admin RPC unloads, 15 times; each metrics update is slowed
    (a sleep between clearing and setting the labels) so unlocked updates would interleave. The
    exported adapter labels must equal the loaded set after every round."""
    registry, metrics = server.engine.registry, server.metrics
    real_labels = metrics.adapter_info.labels

    def slow_labels(*args: Any) -> Any:
        time.sleep(0.002)
        return real_labels(*args)

    monkeypatch.setattr(metrics.adapter_info, "labels", slow_labels)
    for round_ in range(15):
        client.load_adapter("race-api", path="tone.onnx_adapter")
        barrier = threading.Barrier(2)

        def watcher(barrier: threading.Barrier, name: str) -> None:
            barrier.wait()
            registry.load(name, path="extract.onnx_adapter", source="watch")

        thread = threading.Thread(target=watcher, args=(barrier, f"race-watch{round_ % 2}"))
        thread.start()
        barrier.wait()
        client.unload_adapter("race-api")
        thread.join()
        exported = {dict(labels)["adapter"] for (name, labels), value in metric_samples(server).items()
                    if name == "slmops_adapter_loaded" and value == 1}
        assert exported == set(registry.names()), f"round {round_}"
        assert metric_samples(server)[("slmops_adapters_loaded", ())] == len(registry.names())
        registry.unload(f"race-watch{round_ % 2}", timeout=0)
