"""Reads ``.onnx_adapter`` files (onnxruntime's adapter format) from bytes, a tensor at a time.

Why not ``onnxruntime.AdapterFormat.read_adapter``: it parses and copies the whole file in ONE
C++ call that holds Python's GIL. In the server, a load runs beside the scheduler thread, which
needs the GIL between decode steps: reading a 175 MB adapter that way stalled every running stream
for 74-118 ms (bench/bench_adapter_stall.py). Here the file's FlatBuffer table is walked with the
``flatbuffers`` package (onnxruntime's own dependency, so nothing new in the serve image) and each
tensor is one numpy copy, which releases the GIL: the scheduler waits at most one tensor's copy.
Reading from bytes also means a server checks and loads the very bytes it was given or read.

The format (onnxruntime/lora/adapter_format/adapter_schema.fbs, file identifier ``TORT``)::

    table Parameter { name:string; dims:[int64]; data_type:TensorDataType; raw_data:[uint8]; }
    table Adapter { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }

Every offset is checked against the buffer before it is read, so a corrupt or truncated file is an
``AdapterFormatError`` (never a crash or a huge allocation). The tests compare this reader with
onnxruntime's on real adapters.
"""

from __future__ import annotations

from typing import Any

FILE_IDENTIFIER = b"TORT"
FORMAT_VERSION = 1  # onnxruntime's adapters::kAdapterFormatVersion
# ONNX TensorProto data types -> numpy dtype names (bfloat16 has no numpy dtype)
NUMPY_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
MAX_DIMS = 8


class AdapterFormatError(ValueError):
    """The bytes are not a readable .onnx_adapter file; the message says where it broke."""


class _Table:
    """A FlatBuffer table whose every read is bounds-checked first."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        from flatbuffers.table import Table

        self.buf = buf
        self._check(pos, 4)
        self.table = Table(buf, pos)
        vtable = pos - self._get("soffset", pos)
        self._check(vtable, 4)
        self.vtable = vtable
        self.vtable_len = self._get("voffset", vtable)

    def _check(self, pos: int, size: int) -> None:
        if pos < 0 or pos + size > len(self.buf):
            raise AdapterFormatError(f"offset {pos} (+{size}) lies outside the {len(self.buf)}-byte file")

    def _get(self, kind: str, pos: int) -> int:
        from flatbuffers import number_types as N

        flags = {"soffset": N.SOffsetTFlags, "voffset": N.VOffsetTFlags, "uoffset": N.UOffsetTFlags,
                 "int32": N.Int32Flags}[kind]
        self._check(pos, flags.bytewidth)
        return int(self.table.Get(flags, pos))

    def field(self, index: int) -> int:
        """Position of field ``index`` (0 = absent)."""
        slot = 4 + 2 * index
        if slot >= self.vtable_len:
            return 0
        self._check(self.vtable + slot, 2)
        offset = self._get("voffset", self.vtable + slot)
        return self.table.Pos + offset if offset else 0

    def int32(self, index: int, default: int = 0) -> int:
        pos = self.field(index)
        return self._get("int32", pos) if pos else default

    def vector(self, index: int, item_size: int) -> tuple[int, int]:
        """(start, length) of vector field ``index``; (0, 0) when absent."""
        pos = self.field(index)
        if not pos:
            return 0, 0
        at = pos + self._get("uoffset", pos)
        length = self._get("uoffset", at)
        self._check(at + 4, length * item_size)
        return at + 4, length

    def table_at(self, pos: int) -> _Table:
        return _Table(self.buf, pos + self._get("uoffset", pos))


def read_adapter_bytes(data: Any) -> dict[str, Any]:
    """``{parameter name: numpy array}`` of an .onnx_adapter file's bytes (bytes, bytearray, or any
    contiguous buffer such as :func:`read_file`'s array); the arrays own their memory.

    Raises:
        AdapterFormatError: the bytes are not an .onnx_adapter file of a known format version.
    """
    import numpy as np

    buf = memoryview(data).cast("B")
    if len(buf) < 8 or bytes(buf[4:8]) != FILE_IDENTIFIER:
        raise AdapterFormatError(f"no '{FILE_IDENTIFIER.decode()}' file identifier (not an .onnx_adapter file)")
    try:
        root = _Table(buf, int.from_bytes(buf[0:4], "little"))
        version = root.int32(0)
        if version != FORMAT_VERSION:
            raise AdapterFormatError(f"format version {version}; this reader knows version {FORMAT_VERSION}")
        start, count = root.vector(3, 4)
        tensors: dict[str, Any] = {}
        for i in range(count):
            param = root.table_at(start + 4 * i)
            name_pos = param.field(0)
            if not name_pos:
                raise AdapterFormatError(f"parameter {i} has no name")
            name_start, name_len = param.vector(0, 1)
            name = bytes(buf[name_start:name_start + name_len]).decode("utf-8")
            dims_start, ndims = param.vector(1, 8)
            if ndims > MAX_DIMS:
                raise AdapterFormatError(f"parameter '{name}' has {ndims} dimensions")
            dims = [int(d) for d in np.frombuffer(buf, "<i8", ndims, dims_start)]
            code = param.int32(2)
            if code not in NUMPY_DTYPES:
                raise AdapterFormatError(f"parameter '{name}' has data type {code}, which this reader does not know")
            dtype = np.dtype(NUMPY_DTYPES[code]).newbyteorder("<")
            raw_start, raw_len = param.vector(3, 1)
            if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) * dtype.itemsize != raw_len:
                raise AdapterFormatError(f"parameter '{name}' has dims {dims} but {raw_len} bytes of data")
            if name in tensors:
                raise AdapterFormatError(f"parameter '{name}' appears twice")
            view = np.frombuffer(buf, dtype, raw_len // dtype.itemsize if dtype.itemsize else 0, raw_start)
            # one copy per tensor (numpy releases the GIL for it); native byte order for onnxruntime
            tensors[name] = view.reshape(dims).astype(dtype.newbyteorder("="), copy=True)
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        if isinstance(exc, AdapterFormatError):
            raise
        raise AdapterFormatError(f"corrupt FlatBuffer ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - struct.error and friends from a corrupt buffer
        raise AdapterFormatError(f"corrupt FlatBuffer ({type(exc).__name__}: {exc})") from exc
    return tensors


def read_file(path: Any, chunk: int = 8 << 20) -> Any:
    """The bytes of the file at ``path`` as a uint8 numpy array (a buffer ``hashlib`` and
    :func:`read_adapter_bytes` take), read ``chunk`` bytes per call.

    Why not ``Path.read_bytes``: for a 175 MB file it held the GIL for up to 60 ms in one piece
    (allocating and resizing one bytes object); here the buffer is allocated unfilled and every
    ``readinto`` releases the GIL."""
    import os

    import numpy as np

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(size, np.uint8)
        view = buf.data  # a writable memoryview of the array
        done = 0
        while done < size:
            got = f.readinto(view[done:done + chunk])
            if not got:  # the file shrank while it was read
                return buf[:done].copy()
            done += got
        rest = f.read()  # the file grew while it was read
    return np.concatenate([buf, np.frombuffer(rest, np.uint8)]) if rest else buf

