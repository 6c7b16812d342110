"""The pass pipeline, as a list you can read.

    fp32:       RemoveIdentity → ConstantMetadataReads → DecomposeRMSNorm → DecomposeGroupedQueryAttention → DecomposeAdaptivePool
                → DecomposeAvgPoolDivisor → DecomposeUnexportable → EliminateDeadCode
    quantized:  RemoveIdentity → ConstantMetadataReads → DecomposeRMSNorm → DecomposeGroupedQueryAttention → DecomposeAdaptivePool
                → DecomposeAvgPoolDivisor → DecomposeUnexportable → EliminateDeadCode
                → RecordFloatOutputs → DecomposeWindowAttention → DecomposeCubicDownscale → MatmulAsLinear → DecomposeCircularPadding
                → MeanAsGlobalPool
                → FoldConstants → FoldBatchNorm → FoldConstantScale → EqualizeInputs → EqualizeWeights → SelectLayers
                → [AllocateWeightBits] → InsertQuantizers → QuantizeOutputs → QuantizeResiduals → CheckFloatOutputs → Calibrate
                → [AdaptiveRounding] → ShareInt8Params → PairSafeInt8Weights
                → BiasCorrection → QuantizeBias
                → BindIntegerLayers → BindIntegerAdds → BindIntegerMuls → BindIntegerSigmoids → BindIntegerPools
                → EliminateDeadCode

Each step is switched by ``CompileOptions``; nothing else runs in the driver.
"""
from __future__ import annotations

import collections.abc

from qcompile.passes.base import Pass
from qcompile.passes.cleanup import (ConstantMetadataReads, DecomposeAdaptivePool, DecomposeAvgPoolDivisor,
                                     DecomposeGroupedQueryAttention, DecomposeRMSNorm, DecomposeUnexportable,
                                     EliminateDeadCode, RemoveIdentity)

from .options import CompileOptions


def build_passes(opts: CompileOptions, calib=None, progress=None, example=None) -> list[Pass]:
    """The passes for ``opts``; ``calib`` feeds calibration, ``example`` (model inputs) the float-function check
    where there is no calibration data."""
    if not isinstance(opts, CompileOptions):  # build_passes(calib): "'Tensor' object has no attribute 'quantized'"
        from .errors import UserError

        raise UserError(f"build_passes takes the options first, got {type(opts).__name__}: "
                        "build_passes(CompileOptions(scheme='apot', bits=4), calib)")
    passes: list[Pass] = [RemoveIdentity(), ConstantMetadataReads(), DecomposeRMSNorm(), DecomposeGroupedQueryAttention(),
                          DecomposeAdaptivePool(), DecomposeAvgPoolDivisor(), DecomposeUnexportable(),
                          EliminateDeadCode()]
    if not opts.quantized:
        return passes
    from .quantize_pipeline import quantization_passes  # the quantization passes hang from here

    if isinstance(calib, collections.abc.Iterator):
        # a generator of batches feeds several passes: read once here (the first pass used it up, and the next
        # one said "the calibration data is empty")
        calib = list(calib)
    return passes + quantization_passes(opts, calib, progress, example=example)
