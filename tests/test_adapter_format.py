"""slmops.adapter_format reads what onnxruntime's own reader reads, and refuses what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.synthetic import write_adapter


def ort_read(path: Path) -> dict[str, Any] | None:
    """onnxruntime's reader (None when it refuses the file)."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        return {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}
    except Exception:  # noqa: BLE001 - onnxruntime raises RuntimeError (or worse) for a corrupt file
        return None


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"model.layers.{i}.attn.qkv_proj.lora_{s}.MatMul.weight":
              rng.standard_normal((64, 8) if s == "A" else (8, 192)).astype(np.float32) for i in range(3) for s in "AB"}
    return write_adapter(arrays, tmp_path_factory.mktemp("fmt") / "a.onnx_adapter")


def test_same_arrays_as_onnxruntime(adapter: Path, tmp_path: Path) -> None:
    import numpy as np

    from slmops.adapter_format import read_adapter_bytes
    from slmops.contract import read_adapter_tensors

    half = write_adapter({"x": np.arange(12, dtype=np.float16).reshape(3, 4), "empty": np.zeros((0, 5), np.float32),
                          "i": np.array([1, -2], np.int64)}, tmp_path / "h.onnx_adapter")
    for path in (adapter, half):
        ref = ort_read(path)
        got = read_adapter_tensors(path)
        assert ref is not None and sorted(ref) == sorted(got)
        for name, array in ref.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape
            assert np.array_equal(got[name], array)
            assert got[name].flags.owndata and got[name].flags.writeable  # a copy, not a view of the bytes
    assert read_adapter_bytes(bytearray(adapter.read_bytes())).keys() == ort_read(adapter).keys()  # type: ignore[union-attr]


def test_refuses_what_onnxruntime_refuses(adapter: Path, tmp_path: Path) -> None:
    """Random byte flips and truncations: both readers accept (then with equal arrays) or both refuse."""
    import numpy as np

    from slmops.adapter_format import AdapterFormatError, read_adapter_bytes

    data = adapter.read_bytes()
    rng = np.random.default_rng(1)
    outcomes: dict[str, int] = {}
    for i in range(150):
        corrupt = bytearray(data)
        # flips mostly in the FlatBuffer's tables (the first and last bytes), some anywhere
        for pos in rng.integers(0, len(corrupt), 4) if i % 3 == 0 else [*rng.integers(0, 400, 3), len(corrupt) - 1 - rng.integers(0, 400)]:
            corrupt[pos] = int(rng.integers(0, 256))
        if i % 5 == 0:
            corrupt = corrupt[: int(rng.integers(0, len(corrupt)))]
        path = tmp_path / "c.onnx_adapter"
        path.write_bytes(bytes(corrupt))
        ref = ort_read(path)
        try:
            got = read_adapter_bytes(bytes(corrupt))
        except AdapterFormatError:
            got = None
        assert (ref is None) == (got is None), f"case {i}: onnxruntime {'accepts' if ref is not None else 'refuses'}"
        if ref is not None and got is not None:
            assert sorted(ref) == sorted(got) and all(np.array_equal(ref[k], got[k], equal_nan=True) for k in ref), i
        outcomes["refused" if got is None else "read"] = outcomes.get("refused" if got is None else "read", 0) + 1
    assert outcomes.get("refused", 0) >= 20 and outcomes.get("read", 0) >= 20  # both paths were exercised


@pytest.mark.parametrize("data, words", [
    (b"", "file identifier"),
    (b"garbage that is no adapter at all", "file identifier"),
    (b"\xff\xff\xff\x7fTORT" + bytes(16), "outside"),
])
def test_clear_error(data: bytes, words: str) -> None:
    from slmops.adapter_format import AdapterFormatError, read_adapter_bytes

    with pytest.raises(AdapterFormatError, match=words):
        read_adapter_bytes(data)


def test_read_file_returns_the_file_bytes(tmp_path: Path) -> None:
    import hashlib
    import os

    from slmops.adapter_format import read_file

    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    got = read_file(path, chunk=1024)  # several chunks and a short last one
    assert bytes(got) == data and hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert bytes(read_file(tmp_path / "empty.bin")) == b""
