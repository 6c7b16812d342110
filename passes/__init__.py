"""Graph passes on ``torch.fx.GraphModule`` (installed as ``qcompile.passes``)."""
from .adaptive_rounding import AdaptiveRounding
from .base import Pass, PassError, PassManager, PassResult, Pipeline, VerificationError, verify
from .bias_correction import BiasCorrection
from .calibrate import Calibrate
from .cleanup import (ConstantMetadataReads, DecomposeAdaptivePool, DecomposeAvgPoolDivisor, DecomposeCircularPadding,
                      DecomposeCubicDownscale, DecomposeGroupedQueryAttention, DecomposeRMSNorm, DecomposeUnexportable,
                      EliminateDeadCode, MatmulAsLinear, MeanAsGlobalPool, RemoveIdentity)
from .equalize import EqualizeWeights
from .equalize_inputs import EqualizeInputs
from .float_check import CheckFloatOutputs, RecordFloatOutputs
from .fold_bn import ChannelStats, FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_scale import FoldConstantScale
from .insert_quant import InsertQuantizers
from .int8_pairs import PairSafeInt8Weights
from .mixed_precision import AllocateWeightBits
from .int8_region import (BindIntegerAdds, BindIntegerMuls, BindIntegerPools, BindIntegerSigmoids, QuantizeResiduals,
                          ShareInt8Params)
from .quantize_bias import QuantizeBias
from .quantize_outputs import BindIntegerLayers, QuantizeOutputs
from .select import Override, SelectLayers, layer_table, load_overrides, parse_exclude
from .window_attention import DecomposeWindowAttention

__all__ = ["Pass", "PassResult", "Pipeline", "PassManager", "PassError", "VerificationError", "verify",
           "EliminateDeadCode", "RemoveIdentity", "ConstantMetadataReads", "FoldConstants", "FoldBatchNorm", "FoldConstantScale", "ChannelStats",
           "EqualizeWeights", "EqualizeInputs",
           "SelectLayers", "AllocateWeightBits", "Override", "layer_table", "load_overrides", "parse_exclude", "InsertQuantizers", "QuantizeOutputs",
           "Calibrate", "AdaptiveRounding", "BiasCorrection", "QuantizeBias", "BindIntegerLayers",
           "QuantizeResiduals", "ShareInt8Params", "BindIntegerAdds",
           "BindIntegerPools", "BindIntegerMuls", "BindIntegerSigmoids", "DecomposeWindowAttention", "DecomposeRMSNorm", "DecomposeGroupedQueryAttention", "DecomposeCircularPadding",
           "DecomposeAdaptivePool", "DecomposeCubicDownscale", "DecomposeAvgPoolDivisor", "DecomposeUnexportable",
           "MatmulAsLinear",
           "MeanAsGlobalPool",
           "RecordFloatOutputs", "CheckFloatOutputs", "PairSafeInt8Weights"]
