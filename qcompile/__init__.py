"""qcompile: a quantization compiler for PyTorch models (APoT, PoT and uniform levels to ONNX).

    result = qcompile.compile(model, example_inputs, scheme="apot", bits=4, calib=x, output="model.onnx")
    result.model        # the simulation GraphModule (runs in PyTorch)
    result.onnx_path    # the ONNX file, validated in onnxruntime
    result.report       # the validation report

The pieces are importable for people who assemble their own pipeline: ``qcompile.trace``,
``qcompile.passes`` (``Pipeline``, the passes), ``qcompile.export`` and ``qcompile.runtime``.
"""
from .api import CompileResult, compile
from .errors import UserError, ValidationFailed
from .export import export_onnx, save_atomic
from .frontend import load_model, trace
from .options import CompileOptions

__version__ = "0.3.0"

__all__ = ["compile", "CompileResult", "CompileOptions", "trace", "load_model", "export_onnx", "save_atomic",
           "UserError", "ValidationFailed", "__version__"]
