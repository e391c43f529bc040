"""Weight-only quantization (int4 blocks or int8 per channel) in the form onnxruntime turns into ``MatMulNBits``.

Only weights are quantized; activations stay float. A DequantizeLinear
feeding a MatMul is only worth its smaller weight when onnxruntime fuses
the pair into ``MatMulNBits`` (4 bits in blocks along K, or 8 bits with a
scale per output column); an unfused DequantizeLinear expands the whole
weight on every run (a 3-layer 1024-wide Relu MLP at batch 1 ran 11x slower
than float; fused, it runs several times faster: ``make
bench-weight-only``). Measured on onnxruntime 1.32 CPU
(tests/passes/test_qdq_weight_only.py keeps each point true):

- ``DQ -> MatMul`` and ``DQ -> Gemm(transB=0)`` fuse, bias included;
- ``DQ -> Gemm(transB=1)`` does not: the weight is stored transposed and
  the Gemm reads it with ``transB=0``, the same function;
- a ``Relu`` after the layer (directly or after its bias ``Add``) blocks
  the fusion unless it produces a graph output; ``Max(x, 0)`` computes the
  same values (NaN included) and does not block it, so that Relu becomes one.

The fused kernel runs at onnxruntime's ``accuracy_level`` 4 (activations
rounded to int8 per block, for speed), so its outputs differ slightly from
DequantizeLinear plus a float MatMul; the pass's fidelity checks measure
the fused model, as the user will run it.
"""

from __future__ import annotations

__all__ = ["quantize_weights_only"]

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from passes.qdq.placement import Placement, Target
from passes.qdq.rewrite import NodeMaker, quantize_weight, quantize_weight_blockwise
from passes.qdq.summary import QuantizationSummary

_ONNX_DOMAINS = ("", "ai.onnx")


def quantize_weights_only(
    maker: NodeMaker,
    placement: Placement,
    bits: int,
    block_size: int,
    summary: QuantizationSummary,
    rounded: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> None:
    """Stores every target's weight as int4 blocks of ``block_size`` along K (``bits=4``) or int8 per column.

    ``rounded`` holds GPTQ levels [N, K] and scales ([N, blocks] or [N]) by
    weight name (gptq.round_targets); other weights round to nearest.
    Fills ``summary``'s quantized, GPTQ-rounded and float layers and ``weight_bytes_before``.
    """
    rounded = rounded or {}
    for target in placement.targets:
        label = target.node.name or target.node.op_type
        array = target.weight.const_value.numpy()  # type: ignore[union-attr]
        reduction = 1 - target.weight_axis  # K: blocks run along the reduction axis
        if bits == 4 and array.shape[reduction] < block_size:
            summary.float_layers[label] = f"K={array.shape[reduction]} < block_size"
            continue
        levels = rounded.get(target.weight.name or "")
        weight = _untransposed_weight(maker, target)  # now [K, N]
        summary.weight_bytes_before += array.nbytes
        if bits == 4:
            quantize_weight_blockwise(maker, target.node, weight, 0, block_size, None if levels is None else (levels[0].T, levels[1].T))
        else:
            quantize_weight(maker, target.node, weight, 1, reduce_range=False, rounded=None if levels is None else (levels[0].T, levels[1]))
        _relus_to_max(maker, target.node)
        summary.quantized.append(label)
        if levels is not None:
            summary.gptq.append(label)


def _untransposed_weight(maker: NodeMaker, target: Target) -> ir.Value:
    """The layer's weight as [K, N]; a Gemm with ``transB=1`` gets a transposed copy and ``transB=0``."""
    node, weight = target.node, target.weight
    if node.op_type != "Gemm" or not node.attributes.get_int("transB", 0):
        return weight
    transposed = maker.initializer(f"{weight.name or 'weight'}_kn", np.ascontiguousarray(weight.const_value.numpy().T))  # type: ignore[union-attr]
    node.replace_input_with(1, transposed)
    node.attributes["transB"] = ir.AttrInt64("transB", 0)
    if not weight.uses() and weight.name in maker.graph.initializers:
        maker.graph.initializers.pop(weight.name)
    return transposed


def _relus_to_max(maker: NodeMaker, layer: ir.Node) -> None:
    """Turns each Relu reading the layer's output, directly or through a constant Add, into Max(x, 0)."""
    output = layer.outputs[0]
    readers = [user for user, _ in output.uses()]
    for user in list(readers):
        if user.op_type == "Add" and user.domain in _ONNX_DOMAINS and any(_is_constant(value) for value in user.inputs):
            readers.extend(reader for reader, _ in user.outputs[0].uses())
    zero: ir.Value | None = None
    for relu in readers:
        x = relu.inputs[0]
        if relu.op_type != "Relu" or relu.domain not in _ONNX_DOMAINS or x is None or x.dtype not in (None, ir.DataType.FLOAT):
            continue
        zero = zero or maker.initializer("relu_zero", np.zeros((), dtype=np.float32))
        relu.op_type = "Max"
        relu.resize_inputs(2)
        relu.replace_input_with(1, zero)


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None
