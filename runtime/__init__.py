"""qcompile.runtime: run emitted ONNX files in onnxruntime and validate them against their PyTorch reference."""
from .session import session, run
from .validation import ValidationReport, compare_outputs, validate, validate_quantized

__all__ = ["session", "run", "ValidationReport", "compare_outputs", "validate", "validate_quantized"]
