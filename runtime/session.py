"""onnxruntime sessions for files emitted by qcompile."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort


def session_options(threads: int | None = None, spinning: bool = False,
                    optimized_model_path: str | None = None,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        # idle pool threads spinning disturb other sessions in the process (and the PyTorch reference).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    so.log_severity_level = 4  # fatal only: an error is raised to the caller, which says it in one line
    return so


def session(path_or_bytes, threads: int | None = None, spinning: bool = False,
            optimized_model_path: str | None = None, **kwargs) -> ort.InferenceSession:
    """Open an onnxruntime CPU session for an emitted file (path or serialized bytes)."""
    so = session_options(threads, spinning, optimized_model_path, **kwargs)
    try:
        return ort.InferenceSession(path_or_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            raise
        _user_file_error(path_or_bytes, exc)
        raise


def _user_file_error(path, exc: BaseException) -> None:
    """A path that names no file, or a file that is no ONNX model: a one-line UserError (onnxruntime said
    ``NoSuchFile`` or ``InvalidProtobuf ... No graph was found``); a model onnxruntime refuses otherwise is left
    to its own error."""
    import os

    import onnx

    from qcompile.errors import UserError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"no ONNX file at {path!r}; give the path of a file qcompile wrote") from None
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a folder; give the path of an .onnx file") from None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 -- not a protobuf at all
        model = None
    if model is None or not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise UserError(f"{path!r} is not an ONNX file (onnxruntime: {str(exc).strip().splitlines()[0][:160]}); "
                        "give a file qcompile wrote") from None


#: metadata key of a file with several inputs: the file's names for all of ``forward``'s inputs, in order (JSON
#: list), the ones the export dropped (never read) included
INPUTS_KEY = "qcompile.inputs"


def recorded_inputs(metadata) -> list[str] | None:
    """The input names a file records under ``INPUTS_KEY`` (``metadata``: an ``onnx.ModelProto``, an
    ``InferenceSession`` or a ``{key: value}`` map), or None."""
    import json

    if isinstance(metadata, ort.InferenceSession):
        metadata = metadata.get_modelmeta().custom_metadata_map
    elif hasattr(metadata, "metadata_props"):
        metadata = {p.key: p.value for p in metadata.metadata_props}
    value = metadata.get(INPUTS_KEY) if isinstance(metadata, dict) else None
    try:
        names = json.loads(value) if value else None
    except ValueError:
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def file_inputs(names: Sequence[str], inputs: Sequence, all_names: Sequence[str] | None = None) -> list:
    """The model inputs the file takes, in its order: all of them, or, where the export dropped inputs ``forward``
    never reads (as torch.onnx does), those its names point at among ``all_names`` (the file's ``INPUTS_KEY``
    record), or by their ``input_<k>`` names. The arrays of a model ``m(a, x)`` that ignores ``a`` went to the
    file's one input by position (``a`` for ``x``), and the compile failed."""
    import re

    inputs = list(inputs)
    if len(inputs) > len(names):
        if all_names is not None and len(all_names) == len(inputs) and all(n in all_names for n in names):
            return [inputs[list(all_names).index(n)] for n in names]
        index = [re.fullmatch(r"input_(\d+)", n) for n in names]
        if all(index) and all(int(m.group(1)) < len(inputs) for m in index):
            return [inputs[int(m.group(1))] for m in index]
    return inputs


def run(sess: ort.InferenceSession, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``sess`` on positional inputs (numpy arrays, one per model input) and return all outputs."""
    metas = sess.get_inputs()
    picked = file_inputs([m.name for m in metas], inputs, recorded_inputs(sess) if len(metas) < len(inputs) else None)
    feeds = {meta.name: np.ascontiguousarray(x) for meta, x in zip(metas, picked)}
    return sess.run(None, feeds)


def u8s8_saturates() -> bool:
    """Whether this machine's onnxruntime computes uint8 × int8 products inexactly.

    On x86 CPUs without VNNI (AVX2 or older), MLAS multiplies uint8 activations by int8 weights with
    ``pmaddubsw``, which adds each pair of products in a saturating int16: 255·127 + 255·127 = 64770 becomes
    32767, so an int8 layer whose codes reach both ends is not the integer convolution it describes (seen here:
    up to 36 output codes off on the digits model). uint8 × uint8 (weights stored with zero point 128) widens to
    int16 first and is exact everywhere; so is uint8 × int8 on VNNI and ARM. The probe runs the worst case once
    per process through both kernels onnxruntime fuses a quantized layer into (QLinearConv, MatMulInteger)."""
    return _u8s8_saturates()


def _u8s8_saturates_uncached() -> bool:
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    a = np.full((4, k), 255, np.uint8)
    w = np.full((k, n), 127, np.int8)
    zero_u8, zero_i8 = np.array(0, np.uint8), np.zeros(n, np.int8)
    wc = np.ascontiguousarray(w.T.reshape(n, k, 1, 1))
    f32, one = np.float32, np.array(1.0, np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wc, "wc"),
             numpy_helper.from_array(zero_u8, "za"), numpy_helper.from_array(zero_i8, "zw"),
             numpy_helper.from_array(one, "s1"), numpy_helper.from_array(np.full(n, 1.0, f32), "sw"),
             numpy_helper.from_array(np.array(float(255 * 127 * k) / 200.0, f32), "sy"),
             numpy_helper.from_array(zero_u8, "zy")]
    nodes = [helper.make_node("MatMulInteger", ["a", "w", "za", "zw"], ["mm"]),
             helper.make_node("QLinearConv", ["a4", "s1", "za", "wc", "sw", "zw", "sy", "zy"], ["conv"])]
    graph = helper.make_graph(
        nodes, "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k]),
         helper.make_tensor_value_info("a4", TensorProto.UINT8, [1, k, 2, 2])],
        [helper.make_tensor_value_info("mm", TensorProto.INT32, None),
         helper.make_tensor_value_info("conv", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = session(model.SerializeToString(), threads=1)
    mm, conv = sess.run(None, {"a": a, "a4": np.full((1, k, 2, 2), 255, np.uint8)})
    exact = 255 * 127 * k
    return bool(np.any(mm != exact) or np.any(conv != 200))


_PROBE: list = []


def _u8s8_saturates() -> bool:
    if not _PROBE:
        _PROBE.append(_u8s8_saturates_uncached())
    return _PROBE[0]
