"""``qcompile demo``: compile the bundled digits CNN and show test accuracy before and after, in onnxruntime."""
from __future__ import annotations

import os
import sys

import torch

from qcompile.models import digits
from qcompile.runtime.validation import run_onnx


def run_demo(scheme: str = "apot", bits: int = 4, output: str = "digits_demo.onnx", emit: str = "standard",
             **options) -> int:
    """``options``: further :class:`CompileOptions` fields (``wbits``, ``abits``, ``wscheme``, ``ascheme``,
    ``exclude``, ``int8_weights``); ``None`` values are left at their defaults."""
    from .api import compile as qcompile_compile
    from .errors import UserError
    from .export import same_file

    if os.path.exists(digits.WEIGHTS) and same_file(os.path.abspath(output), digits.WEIGHTS):
        # compile's checks know the model's module sources, not where the demo's weights come from
        raise UserError(f"-o {output!r} is the demo's bundled weights file; writing there would overwrite them: "
                        "choose another -o path (such as digits_demo.onnx)")
    model = digits.pretrained()
    x_tr, _, x_te, y_te = digits.load_split()
    calib = x_tr[:32]
    with torch.no_grad():
        acc_float = digits.accuracy(model(x_te), y_te)
    from .options import CompileOptions

    options = {k: v for k, v in options.items() if v is not None}
    described = CompileOptions(scheme=scheme, bits=bits, **options).describe()
    print(f"qcompile demo: digits CNN ({digits.SPEC}, bundled weights), 500 held-out test images, "
          f"32 calibration images; {described}")
    result = qcompile_compile(model, calib[:1], scheme=scheme, bits=bits, calib=calib, output=output,
                              validation_inputs=x_te, emit=emit, **options,
                              callback=lambda t: print(f"  pass {t.name:<30} {1000 * t.seconds:7.1f} ms"))
    logits = run_onnx(result.onnx_path, x_te)[0]
    acc_onnx = digits.accuracy(logits, y_te)
    with torch.no_grad():
        acc_sim = digits.accuracy(result.model(x_te), y_te)
    from .summary import layer_lines

    for line in layer_lines(result.model) + result.summary.get("lines", []):
        print(line)
    print(f"wrote {result.onnx_path}")
    print(f"accuracy  float (PyTorch): {100 * acc_float:.2f}%   simulation (PyTorch): {100 * acc_sim:.2f}%   "
          f"ONNX (onnxruntime): {100 * acc_onnx:.2f}%")
    from .options import int8_grid_note

    note = int8_grid_note(result.options, result.model)
    if note:
        print(f"qcompile: warning: {note}", file=sys.stderr)
    if result.report is not None:
        print(result.report.summary())
        return 0 if result.report.passed else 1
    return 0
