"""Checks shared by ``prune`` and ``lowrank`` on the layers they change: which operand is the constant, quantized weights, NaN/Inf.

A weight holding NaN/Inf is left whole: magnitude ranks and SVD mean
nothing on it (numpy's SVD fails with "SVD did not converge"), and a fit on
calibration inputs holding NaN/Inf would write NaN weights.
"""

from __future__ import annotations

__all__ = [
    "GRAPH_INPUT_WEIGHT",
    "NONFINITE_INPUTS",
    "finite",
    "layer_label",
    "left_constant",
    "nonfinite_count",
    "behind_dequantize",
    "quantized_weight",
]

import numpy as np
import onnx_ir as ir

NONFINITE_INPUTS = "the layer's calibration inputs hold NaN/Inf"
# An initializer that is also a graph input is a default the caller may override. Models below
# IR version 4 list every initializer as an input, so there it is the usual case, not a choice.
GRAPH_INPUT_WEIGHT = "weight is a graph input, which callers may override"


def layer_label(node: ir.Node) -> str:
    """The node's name in a summary; unnamed nodes go by op type and output, so that two of them stay apart."""
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def left_constant(node: ir.Node) -> bool:
    """A MatMul or Gemm whose first operand is the constant and whose second is not (W @ x, not x @ W)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    first, second = node.inputs[0], node.inputs[1]
    return _constant(first) and not _constant(second)


# onnxruntime's quantizer writes com.microsoft's DequantizeLinear for types the standard one lacked.
_DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")


def behind_dequantize(weight: ir.Value | None) -> bool:
    """Whether ``weight`` is a DequantizeLinear of a constant: a model already through qdq (or onnxruntime's quantizer)."""
    producer = weight.producer() if weight is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in _DEQUANTIZE_DOMAINS or not producer.inputs:
        return False
    return _constant(producer.inputs[0])


def quantized_weight(weight: ir.Value | None, pass_name: str) -> str | None:
    """Why ``weight`` is left alone when it is behind a DequantizeLinear (:func:`behind_dequantize`), else None.

    Its int8 levels would have to be requantized after the change, so the
    fix is the order of the passes, not a rewrite here.
    """
    return f"weight is quantized (behind DequantizeLinear): run {pass_name} before qdq" if behind_dequantize(weight) else None


def nonfinite_count(array: np.ndarray) -> int:
    """How many entries of ``array`` are NaN or infinite (0 for integer arrays)."""
    array = np.asarray(array)
    return int(np.count_nonzero(~np.isfinite(array))) if array.dtype.kind in "fc" else 0


def finite(*arrays: np.ndarray) -> bool:
    """Whether every entry of every array is finite."""
    return all(bool(np.all(np.isfinite(array))) for array in arrays)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()
