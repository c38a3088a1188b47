"""The committed gRPC code is what protoc makes of protos/ today, and the contract keeps its names."""

from __future__ import annotations

import re
from pathlib import Path

from slmops_serve import protogen


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in protogen.generate(output_root=tmp_path)}
    committed_dir = protogen.OUTPUT_ROOT / protogen.PACKAGE_DIR
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.name.endswith(protogen.GENERATED_SUFFIXES)}
    assert set(fresh) == set(committed), "run `make protos` (python -m slmops_serve.protogen) and commit src/slmops/v1"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated files {stale}: run `make protos` and commit src/slmops/v1"


def test_generated_imports_go_through_the_installed_package() -> None:
    for path in (protogen.OUTPUT_ROOT / protogen.PACKAGE_DIR).glob("*_pb2*.py"):
        imports = [line for line in path.read_text().splitlines() if re.match(r"^(from|import) ", line)]
        local = [line for line in imports if re.search(r"\b\w+_pb2\b", line)]
        assert all(line.startswith("from slmops.v1 import ") for line in local), (path.name, local)


def test_every_rpc_has_a_comment() -> None:
    for proto in protogen.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(("rpc ", "service ")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1}: `{line.strip()}` needs a comment"


def test_contract_field_names() -> None:
    from slmops.v1 import adapters_pb2, generation_pb2

    def fields(message: type) -> set[str]:
        return set(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]

    assert {"prompt", "messages", "adapter", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "request_id"} <= fields(generation_pb2.GenerateRequest)
    assert {"role", "content"} <= fields(generation_pb2.ChatMessage)
    for response in (generation_pb2.GenerateResponse, generation_pb2.GenerateStreamResponse):
        assert {"text", "finish_reason", "usage", "adapter", "adapter_sha256", "timings"} <= fields(response)
    assert {"time_to_first_token_ms", "total_ms"} <= fields(generation_pb2.Timings)
    assert {"name", "path", "data", "sha256"} <= fields(adapters_pb2.LoadAdapterRequest)
    assert {"name"} <= fields(adapters_pb2.UnloadAdapterRequest)
    assert {"name", "size", "sha256", "data"} <= fields(adapters_pb2.UploadAdapterChunk)
    services = {s.full_name: {m.name for m in s.methods} for f in (generation_pb2, adapters_pb2)
                for s in f.DESCRIPTOR.services_by_name.values()}
    assert services == {"slmops.v1.Generation": {"Generate", "GenerateStream"},
                        "slmops.v1.Adapters": {"ListAdapters", "LoadAdapter", "UploadAdapter", "UnloadAdapter"}}
