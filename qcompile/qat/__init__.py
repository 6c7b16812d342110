"""qcompile.qat: quantization-aware training whose result goes through the same pipeline and export.

    gm = qcompile.qat.prepare(model, example, scheme="apot", bits=4, method="apot", calib=x_train[:256])
    opt = torch.optim.AdamW(qcompile.qat.param_groups(gm, lr_alpha=1e-2, wd_alpha=1e-4), lr=1e-3)
    ...train gm with your own loop...
    result = qcompile.qat.export(gm, example, output="model.onnx", validation_inputs=x_test)
    # or: qcompile.compile(qcompile.qat.convert(gm), example, scheme="apot", bits=4, ...)

Methods (``docs/qat.md``): ``apot`` (weight normalisation + RCF, APoT), ``pact`` (learned clip, PACT gradient),
``ste`` (PTQ clip kept, STE), ``sdq`` (α·σ clipping, eq. 6/8; :func:`change_bits` for progressive training with
eq. 11 re-scaling, :func:`freeze_quantizers` for the second phase).
"""
from .convert import convert, export
from .modules import LearnableFakeQuantize, SDQFakeQuantize, grad_scale, learnable_quantizers
from .prepare import METHODS, QATConfig, config_of, param_groups, prepare
from .schedule import change_bits, freeze_quantizers, rescale_alpha

__all__ = ["prepare", "convert", "export", "param_groups", "change_bits", "freeze_quantizers", "rescale_alpha",
           "config_of", "QATConfig", "METHODS", "LearnableFakeQuantize", "SDQFakeQuantize", "learnable_quantizers",
           "grad_scale"]
