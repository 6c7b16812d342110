"""qcompile: a quantization compiler for PyTorch models (APoT, PoT and uniform levels to ONNX).

    result = qcompile.compile(model, example_inputs, scheme="apot", bits=4, calib=x, output="model.onnx")
    result.model        # the simulation GraphModule (runs in PyTorch)
    result.onnx_path    # the ONNX file, validated in onnxruntime
    result.report       # the validation report

The pieces are importable for people who assemble their own pipeline: ``qcompile.trace``,
``qcompile.passes`` (``Pipeline``, the passes), ``qcompile.export`` and ``qcompile.runtime``.
"""
import os as _os
import sys as _sys


def _running_the_command() -> bool:
    """Whether this process is the ``qcompile`` command (the console script or ``python -m qcompile.cli``)."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    return _os.path.basename(argv0) == "qcompile" or argv0.replace(_os.sep, "/").endswith("qcompile/cli.py")


if _running_the_command() and "torch" not in _sys.modules:
    # Before torch loads its OpenMP runtime (which reads this once): threads waiting at the end of a parallel region
    # sleep instead of spinning. With another process busy on one of 2 cores, spinning threads starve the one doing
    # the work: a ResNet-18 compile took 6.3 s with the default policy, 3.5 s passive (idle machine: 2.0 vs 2.2 s).
    # Only for the command: a program that imports qcompile keeps its own policy; a value the user set is kept.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import QuantizationWarning, UserError, ValidationFailed  # noqa: E402

__version__ = "0.9.13"

# The rest loads torch, so it is imported on first use (PEP 562): `qcompile --help` answers without torch, and a
# Ctrl-C while torch loads reaches the command's handler (one line) instead of printing an import traceback.
_LAZY = {"compile": "api", "CompileResult": "api", "export_onnx": "export", "save_atomic": "export",
         "load_model": "frontend", "trace": "frontend", "CompileOptions": "options"}
_SUBMODULES = {"api", "cli", "cost", "demo", "emit", "emit_custom", "export", "frontend", "ir", "lowering", "models",
               "pipeline", "quantize_pipeline",
               "options", "qat", "qmodules", "quant", "summary", "traceable", "validate_cli", "passes", "runtime"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)

__all__ = ["compile", "CompileResult", "CompileOptions", "trace", "load_model", "export_onnx", "save_atomic",
           "UserError", "ValidationFailed", "QuantizationWarning", "__version__"]
