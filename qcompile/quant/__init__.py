"""qcompile.quant: the single numeric reference of qcompile (pure numpy/torch, no ONNX).

Level sets of every scheme on an integer grid (:mod:`.levels`), quantize / dequantize / fake-quantize with one
deterministic tie rule shared with the ONNX export and the integer lowering (:mod:`.ops`), and calibration
observers (:mod:`.observers`). The module docstrings state the math and the conventions; ``docs/levels.md``
shows the 4-bit level sets and the integer-range table.
"""
from .levels import (SCHEMES, LevelSet, apot_terms, asymmetric_offsets, integer_table, level_set, levels, sdq_log2_reference,
                     supported)
from .observers import (OBSERVERS, HistogramObserver, KLObserver, LaplaceObserver, MinMaxObserver,
                        MovingAverageMinMaxObserver, MSEObserver, Observer, PercentileObserver, SDQObserver,
                        banner_laplace_ratio, bn_qparams, bn_range, compute_qparams_many, histogram_quant_error,
                        kl_threshold, make_observer)
from .ops import (MIN_ALPHA, ClipParams, asymmetric_qparams, binarize, clip_params_from_range, clip_range,
                  decision_thresholds, dequantize, fake_quantize, quantize, twn_ternarize, unit_from_alpha)

__all__ = [
    "SCHEMES", "LevelSet", "level_set", "levels", "asymmetric_offsets", "supported", "apot_terms", "integer_table", "sdq_log2_reference",
    "MIN_ALPHA", "ClipParams", "unit_from_alpha", "decision_thresholds", "quantize", "dequantize", "fake_quantize",
    "clip_range", "clip_params_from_range", "asymmetric_qparams", "twn_ternarize", "binarize",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "PercentileObserver",
    "MSEObserver", "KLObserver", "LaplaceObserver", "SDQObserver", "OBSERVERS", "compute_qparams_many", "make_observer",
    "bn_range", "bn_qparams", "banner_laplace_ratio", "histogram_quant_error", "kl_threshold",
]
