"""int8 storage for layers that compute in float: about 4x less weight on disk, float speed.

The weight is stored as int8 with a scale per output channel, and
``Cast -> Mul`` widens it back to float in the graph. onnxruntime's constant
folding (on at its basic level and above, so by default) runs that pair once
when the session is created, leaving exactly the float graph with rounded
weights: no cost per run. DequantizeLinear would not do: onnxruntime keeps DQ
nodes out of constant folding (they mark int8 regions for its fusions), so a
float layer fed by one expands its weight on every run.
tests/passes/test_qdq_storage.py checks the folding, so an onnxruntime change
shows up. At ``ORT_DISABLE_ALL`` (graphopt's ``--exact``) the pair runs on
every call.

The qdq pass uses it for layers whose int8 kernel runs slower than float,
and for a model that backs off to float altogether: the user asked for int8
and gets its size without losing speed.
"""

from __future__ import annotations

__all__ = ["StoredWeights", "store_int8", "MIN_ELEMENTS"]

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes.qdq.arithmetic import quantize_per_channel
from passes.qdq.placement import weight_axis
from passes.qdq.prepare import onnx_opset
from passes.qdq.rewrite import NodeMaker

# Below this many values the scale and the two nodes outweigh what int8 saves.
MIN_ELEMENTS = 256
_LAYER_OPS = ("Conv", "MatMul", "Gemm")
# onnxruntime has no Mul kernel before opset 7 (Mul-6 broadcast by attribute):
# the widening would make an opset-6 model unrunnable, so such models store nothing.
_FIRST_RUNNABLE_MUL_OPSET = 7


@dataclass
class StoredWeights:
    """Layers whose weight is now stored as int8, and the weight bytes before and after."""

    layers: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def store_int8(model: ir.Model, layers: Collection[str]) -> StoredWeights:
    """Stores the weights of the named main-graph Conv/MatMul/Gemm nodes as int8, widened by Cast and Mul.

    Nothing is stored below opset 7, where onnxruntime cannot run the Mul.
    A weight is left alone unless it is a float32 initializer that is not a
    graph input, is read by that node only, has a per-channel axis, holds
    only finite values and has at least :data:`MIN_ELEMENTS` values.
    The widened tensor keeps the weight's name, so validation still lines
    it up with the original.
    """
    stored = StoredWeights()
    if onnx_opset(model) < _FIRST_RUNNABLE_MUL_OPSET:
        return stored
    maker = NodeMaker(model)
    for node in list(model.graph):
        if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx") or node.name not in layers:
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        array = _storable(model.graph, node, weight)
        if weight is None or array is None:
            continue
        axis = weight_axis(node, array)
        if axis is None:
            continue
        _widen_into(maker, node, weight, array, axis)
        stored.layers.append(node.name or "")
        stored.bytes_before += array.nbytes
        stored.bytes_after += array.size + 4 * array.shape[axis]
    return stored


def _storable(graph: ir.Graph, node: ir.Node, weight: ir.Value | None) -> np.ndarray | None:
    """The weight's values when it can be stored as int8, else None."""
    if weight is None or weight.const_value is None or weight.is_graph_input() or weight.name not in graph.initializers:
        return None
    if weight.const_value.dtype != ir.DataType.FLOAT or any(user is not node for user, _ in weight.uses()):
        return None
    array = weight.const_value.numpy()
    if array.ndim < 2 or array.size < MIN_ELEMENTS or not np.all(np.isfinite(array)):
        return None
    return array


def _widen_into(maker: NodeMaker, node: ir.Node, weight: ir.Value, array: np.ndarray, axis: int) -> None:
    """Replaces the initializer ``weight`` by int8 values and scales, and Cast -> Mul under its name."""
    name = weight.name or "weight"
    q, scales = quantize_per_channel(array, axis)
    shape = [1] * array.ndim
    shape[axis] = -1
    quantized = maker.initializer(f"{name}_int8", q)
    scale = maker.initializer(f"{name}_scale", scales.reshape(shape))
    cast = maker.node("Cast", [quantized], f"{name}_widened", {"to": ir.AttrInt64("to", ir.DataType.FLOAT)})
    multiply = maker.node("Mul", [cast.outputs[0], scale], f"{name}_stored")
    maker.graph.initializers.pop(name)
    node.replace_input_with(1, multiply.outputs[0])
    # The float tensor the layer reads keeps its name. No type or shape on the two new
    # values: onnxruntime infers them, and on a small model their value_info is
    # a noticeable share of the file (about 100 bytes per weight).
    multiply.outputs[0].name = name
    maker.graph.insert_before(node, [cast, multiply])
