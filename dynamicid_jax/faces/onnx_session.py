"""Creating onnxruntime sessions for the face models (CUDA when available, else CPU)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.input_files import FileFormatError, check_file

ONNX_LIMIT = 2 * 2**30  # protobuf's own limit on one message; larger models keep weights outside


def available_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always last."""
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def drop_unconsumed_inputs(model: onnx.ModelProto) -> None:
    """Remove graph inputs no node reads (in place).

    The int8 SFace file keeps its old float weights as dangling graph inputs, which
    onnxruntime would otherwise demand in the feed.
    """
    consumed = {name for node in model.graph.node for name in node.input}
    for graph_input in [i for i in model.graph.input if i.name not in consumed]:
        model.graph.input.remove(graph_input)


def dequantize(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: per-tensor, per-axis and blocked (opset 21) forms."""
    data = data.astype(np.float32)
    zero_point = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    axis = axis % data.ndim
    if scale.size == 1 and block_size == 0:
        return (data - zero_point.reshape(())) * scale.reshape(())
    if block_size == 0:  # per-axis: 1-D scale along `axis`
        shape = [1] * data.ndim
        shape[axis] = -1
        return (data - zero_point.reshape(shape)) * scale.reshape(shape)
    # blocked: scale has data's rank, with ceil(n / block_size) entries along `axis`
    scale = scale.reshape([1] * (data.ndim - scale.ndim) + list(scale.shape)) if scale.ndim < data.ndim else scale
    zero_point = zero_point.reshape(scale.shape)
    n = data.shape[axis]
    expand = lambda t: np.take(np.repeat(t, block_size, axis=axis), np.arange(n), axis=axis)
    return (data - expand(zero_point)) * expand(scale)


def fold_weight_dequantize(model: onnx.ModelProto) -> None:
    """Replace every DequantizeLinear whose inputs are all initializers by its float result.

    The int8bq zoo files quantise weights only (blockwise, opset 21) and some blocks use
    forms onnxruntime's kernel rejects (a one-element scale with block_size set). Weight-only
    quantisation is dequantised before the float conv anyway, so folding it at load time gives
    the same numbers and sidesteps the kernel's restrictions.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in initializers for i in node.input if i):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        arrays = [numpy_helper.to_array(initializers[i]) if i else None for i in node.input]
        value = dequantize(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None,
                           int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)


def create_session(path: str | pathlib.Path) -> ort.InferenceSession:
    """Load an ONNX file into a session, after the two repairs above (no-ops on clean files)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"ONNX model file not found: {path}")
    check_file(path, "ONNX model file", ONNX_LIMIT)
    try:
        # No external data: the face models are single files, and a hostile file's data paths
        # must not make us open other files.
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:  # the file is not an ONNX model
        raise FileFormatError(f"{path}: not an ONNX model file ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise FileFormatError(f"{path}: not an ONNX model file (no graph nodes)")
    drop_unconsumed_inputs(model)
    fold_weight_dequantize(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the zoo files trigger pages of harmless initializer warnings
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=available_providers())
    except (_ort_state.Fail, _ort_state.InvalidGraph, _ort_state.InvalidProtobuf, _ort_state.NoSuchFile) as e:
        raise FileFormatError(f"{path}: onnxruntime cannot load this model: {str(e).splitlines()[0]}") from None


def run_single_input(session: ort.InferenceSession, blob: np.ndarray) -> list[np.ndarray]:
    """Run a one-input session on a float32 NCHW blob; returns every output in graph order."""
    (graph_input,) = session.get_inputs()
    return session.run(None, {graph_input.name: blob.astype(np.float32)})
