"""slmops: LoRA fine-tuning, multi-adapter ONNX bundles and a hot-swapping gRPC server for small LMs."""

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a WARNING at import on AVX512-BF16 machines when the optional
# `kernels` package (a hub download of a faster 4-bit GEMM) is missing; it then uses its own
# kernels, so there is nothing for a user to do. `--log_level 0/1` still shows it.
import logging as _logging

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
