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
    so.log_severity_level = 3
    return so


def session(path_or_bytes, threads: int | None = None, spinning: bool = False,
            optimized_model_path: str | None = None, **kwargs) -> ort.InferenceSession:
    """Open an onnxruntime CPU session for an emitted file (path or serialized bytes)."""
    so = session_options(threads, spinning, optimized_model_path, **kwargs)
    return ort.InferenceSession(path_or_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``sess`` on positional inputs (numpy arrays) and return all outputs."""
    feeds = {meta.name: np.ascontiguousarray(x) for meta, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)
