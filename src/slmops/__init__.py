"""slmops: LoRA fine-tuning, multi-adapter ONNX bundles and a hot-swapping gRPC server for small LMs."""

__version__ = "0.1.0"
