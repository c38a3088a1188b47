"""Regenerate the committed gRPC code: ``protos/slmops/v1/*.proto`` -> ``src/slmops/v1/*_pb2*.py(i)``.

Run ``python -m slmops_serve.protogen`` (``make protos``). The .proto files live under
``protos/`` with the package path ``slmops/v1/``, so the generated imports already read
``from slmops.v1 import ...`` and need no rewriting. ``tests/serve/test_protos.py`` regenerates
into a temp dir and fails when the committed files are stale. Generated code must not be newer
than the protobuf/grpcio runtime, so regenerate with the grpcio-tools pinned in the dev extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PACKAGE_DIR = Path("slmops") / "v1"
OUTPUT_ROOT = REPO / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / PACKAGE_DIR).glob("*.proto"))


def generate(output_root: Path = OUTPUT_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) on every proto; return the generated files under ``output_root``."""
    from importlib import resources

    from grpc_tools import protoc

    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PACKAGE_DIR}")
    (output_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={output_root}",
            f"--pyi_out={output_root}", f"--grpc_python_out={output_root}",
            *(str(p.relative_to(proto_root)) for p in protos)]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted(p for p in (output_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
