"""The quantization half of the pipeline, built from ``CompileOptions`` (see ``qcompile.pipeline``)."""
from __future__ import annotations

from qcompile.ir import LayerConfig
from qcompile.passes.adaptive_rounding import AdaptiveRounding
from qcompile.passes.base import Pass
from qcompile.passes.bias_correction import BiasCorrection
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.cleanup import (DecomposeCircularPadding, DecomposeCubicDownscale, EliminateDeadCode,
                                     MatmulAsLinear, MeanAsGlobalPool)
from qcompile.passes.equalize import EqualizeWeights
from qcompile.passes.equalize_inputs import EqualizeInputs
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.fold_scale import FoldConstantScale
from qcompile.passes.fold_constants import FoldConstants
from qcompile.passes.float_check import CheckFloatOutputs, RecordFloatOutputs
from qcompile.passes.insert_quant import InsertQuantizers
from qcompile.passes.int8_pairs import PairSafeInt8Weights
from qcompile.passes.mixed_precision import AllocateWeightBits
from qcompile.passes.int8_region import (BindIntegerAdds, BindIntegerMuls, BindIntegerPools, BindIntegerSigmoids,
                                         QuantizeResiduals, ShareInt8Params)
from qcompile.passes.quantize_bias import QuantizeBias
from qcompile.passes.quantize_outputs import BindIntegerLayers, QuantizeOutputs
from qcompile.passes.select import SelectLayers, load_overrides, parse_exclude
from qcompile.passes.window_attention import DecomposeWindowAttention

from .options import CompileOptions, resolve_int8_weights


def default_layer_config(opts: CompileOptions) -> LayerConfig:
    return LayerConfig(action="quant", wscheme=opts.weight_scheme, wbits=opts.weight_bits, ascheme=opts.act_scheme,
                       abits=opts.act_bits, per_channel=opts.per_channel, reason="default")


def quantization_passes(opts: CompileOptions, calib=None, progress=None, example=None) -> list[Pass]:
    # later rules win: --exclude after the config file, so that a layer named there stays float (a config rule
    # quantizing the same layer used to win without a word)
    overrides = load_overrides(opts.config) if opts.config else []
    overrides += parse_exclude(opts.exclude)
    record = RecordFloatOutputs(calib if calib is not None else example)  # outputs on two samples
    # Swin's window attention with its projections as Linear layers; FoldConstants then folds what they read
    passes: list[Pass] = [record, DecomposeWindowAttention(), DecomposeCubicDownscale(), MatmulAsLinear(),
                          DecomposeCircularPadding(), MeanAsGlobalPool(), FoldConstants()]  # weights computed in forward too
    if opts.fold_bn:
        passes += [FoldBatchNorm(), FoldConstantScale()]
    select = SelectLayers(default_layer_config(opts), first_last=opts.keep_first_last,
                          float_downsample=opts.float_downsample, overrides=overrides)
    equalize_inputs = opts.equalize if opts.equalize_inputs is None else opts.equalize_inputs
    if equalize_inputs and calib is not None:  # the first layers' input features: their ranges come from the data
        first8 = opts.keep_first_last == "int8"
        passes.append(EqualizeInputs(calib, weight_bits=8 if first8 else opts.weight_bits,
                                     act_bits=8 if first8 else opts.act_bits, select=select))
    if opts.equalize:
        passes.append(EqualizeWeights(select=select))
    passes.append(select)
    if opts.avg_wbits is not None:  # per-layer weight bits within the budget, before quantizers are made of them
        passes.append(AllocateWeightBits(opts.avg_wbits, calib))
    passes.append(InsertQuantizers(observer=opts.calib_method, asym_levels=opts.asym_levels))
    if opts.int8_outputs:
        passes += [QuantizeOutputs(cells=opts.int8_levels), QuantizeResiduals(observer=opts.calib_method)]
    passes.append(CheckFloatOutputs(record))  # the passes so far kept the model's function
    passes.append(Calibrate(calib, method=opts.calib_method, progress=progress,
                            record_input_means=opts.bias_correction))  # BiasCorrection's E[x], same pass
    if opts.weight_rounding == "adaptive":  # on the calibrated ranges, before the corrections that follow it
        passes.append(AdaptiveRounding(calib))
    if opts.int8_outputs:
        passes.append(ShareInt8Params())
    if opts.quantized and resolve_int8_weights(opts).int8_weights == "s8-safe":
        passes.append(PairSafeInt8Weights())  # before BiasCorrection, which absorbs the mean of its change
    if opts.bias_correction:
        passes.append(BiasCorrection(calib))
    passes += [QuantizeBias(), BindIntegerLayers(cells=opts.int8_levels)]
    if opts.int8_outputs:
        passes += [BindIntegerAdds(), BindIntegerMuls(), BindIntegerSigmoids(), BindIntegerPools()]
    passes.append(EliminateDeadCode())
    return passes
