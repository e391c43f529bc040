"""Graph edits of the ``qdq`` pass: Q/DQ pairs on activations, int8/int4 weights, int32 biases.

Each function edits the main graph in place and keeps names traceable:
an activation's DequantizeLinear output is paired with the QuantizeLinear
input by validation's localization, and a quantized weight's dequantized
value is recorded under ``graphopt.provenance`` as the float weight it
replaces.
"""

from __future__ import annotations

__all__ = [
    "NodeMaker",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_blockwise",
    "quantize_bias_input",
    "set_float_bias",
    "quantize_embedding",
]

import logging

import numpy as np
import onnx_ir as ir

from graphopt import provenance
from graphopt.graphs import iter_graphs
from graphopt.naming import NameAllocator
from passes.qdq.arithmetic import ActivationParams, dequantize, quantize_bias, quantize_blockwise, quantize_per_channel
from passes.qdq.placement import standard_readers

logger = logging.getLogger(__name__)


class NodeMaker:
    """Creates initializers and Q/DQ nodes with fresh names in one graph.

    Renames for ``graphopt.provenance`` wait in :attr:`renames` until
    :meth:`flush` (or leaving a ``with`` block) writes them in one go: the
    metadata is one JSON text, so a write per layer made a run quadratic.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.names = NameAllocator(model)
        self._node_names: set[str] | None = None  # NameAllocator knows value names only
        self.renames: list[tuple[str, str]] = []  # (new name, original name), in the order made

    def __enter__(self) -> NodeMaker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()

    def flush(self) -> None:
        """Records the pending renames in the model's provenance."""
        provenance.record_many(self.model, self.renames)
        self.renames = []

    def initializer(self, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        name = self.names.fresh(base)
        tensor = ir.Tensor(array, dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs: list[ir.Value | None], output: str, attributes: dict | None = None) -> ir.Node:
        node = ir.node(op, inputs, attributes=attributes or {}, name=self.node_name(f"{output}_node"))
        node.outputs[0].name = self.names.fresh(output)
        return node

    def node_name(self, base: str) -> str:
        """A node name unused in the model: a model through qdq before already holds ``<value>_quantized_node``."""
        if self._node_names is None:
            self._node_names = {node.name for graph in iter_graphs(self.model) for node in graph if node.name}
        name = self.names.fresh(base)
        while name in self._node_names:
            name = self.names.fresh(base)
        self._node_names.add(name)
        return name


def quantize_activation(maker: NodeMaker, value: ir.Value, params: ActivationParams) -> ir.Value:
    """Inserts ``value -> QuantizeLinear -> DequantizeLinear`` and moves every standard reader onto the DQ.

    A graph output keeps reading ``value`` itself: outputs stay float. So do
    custom-domain and unknown ops, whose treatment of a lossy input nobody here knows.
    """
    users = standard_readers(value, maker.model.opset_imports)  # before the QuantizeLinear below becomes one
    for user, index in value.uses():
        if (user, index) not in users:
            logger.debug("qdq: %s %s::%s keeps reading float %s", user.name, user.domain, user.op_type, value.name)
    base = value.name or "activation"
    scale = maker.initializer(f"{base}_scale", np.array(params.scale, dtype=np.float32))
    zero = maker.initializer(f"{base}_zero_point", np.array(params.zero_point))
    quantize = maker.node("QuantizeLinear", [value, scale, zero], f"{base}_quantized")
    dequantize = maker.node("DequantizeLinear", [quantize.outputs[0], scale, zero], f"{base}_dequantized")
    _set_type(quantize.outputs[0], ir.DataType.UINT8 if params.dtype == np.uint8 else ir.DataType.INT8, value.shape)
    _set_type(dequantize.outputs[0], ir.DataType.FLOAT, value.shape)
    producer = value.producer()
    if producer is not None and producer.graph is maker.graph:
        maker.graph.insert_after(producer, [quantize, dequantize])
    else:  # a graph input (or an outer value): quantize it first thing
        first = next(iter(maker.graph), None)
        if first is None:
            maker.graph.extend([quantize, dequantize])
        else:
            maker.graph.insert_before(first, [quantize, dequantize])
    for user, index in users:
        user.replace_input_with(index, dequantize.outputs[0])
    return dequantize.outputs[0]


def quantize_weight(
    maker: NodeMaker,
    node: ir.Node,
    weight: ir.Value,
    axis: int,
    *,
    reduce_range: bool,
    rounded: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces ``node``'s float weight by an int8 per-channel initializer and a DequantizeLinear.

    ``rounded`` gives the int8 levels and scales to store (GPTQ's, gptq.py);
    None rounds each weight to its nearest level.

    Returns:
        The per-channel scales (for the bias) and the rounding error
        ``dequantized - weight`` (for bias correction).
    """
    array = weight.const_value.numpy()  # type: ignore[union-attr]
    q, scales = rounded if rounded is not None else quantize_per_channel(array, axis, reduce_range=reduce_range)
    delta = dequantize(q, scales, axis=axis) - array
    base = weight.name or "weight"
    quantized = maker.initializer(f"{base}_quantized", q)
    scale = maker.initializer(f"{base}_scale", scales)
    zero = maker.initializer(f"{base}_zero_point", np.zeros(scales.shape, dtype=np.int8))
    _dequantize_into(maker, node, weight, [quantized, scale, zero], {"axis": axis})
    return scales, delta


def quantize_weight_blockwise(
    maker: NodeMaker,
    node: ir.Node,
    weight: ir.Value,
    axis: int,
    block_size: int,
    rounded: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Replaces ``node``'s float weight by int4 blocks along ``axis`` and a DequantizeLinear (opset 21).

    ``rounded`` gives the levels and block scales to store (GPTQ's); None
    rounds each weight to its nearest level.
    """
    array = weight.const_value.numpy()  # type: ignore[union-attr]
    q, scales = rounded if rounded is not None else quantize_blockwise(array, axis, block_size)
    base = weight.name or "weight"
    quantized = maker.initializer(f"{base}_quantized", q.astype(_int4()), ir.DataType.INT4)
    scale = maker.initializer(f"{base}_scale", scales)
    zero = maker.initializer(f"{base}_zero_point", np.zeros(scales.shape, dtype=_int4()), ir.DataType.INT4)
    _dequantize_into(maker, node, weight, [quantized, scale, zero], {"axis": axis, "block_size": block_size})


def quantize_bias_input(
    maker: NodeMaker,
    node: ir.Node,
    bias: ir.Value,
    input_scale: np.float32,
    weight_scales: np.ndarray,
    values: np.ndarray | None = None,
    *,
    corrected: bool = False,
) -> None:
    """Replaces ``node``'s float bias by int32 [N] with scale input_scale * weight_scales.

    ``values`` are what the bias adds per output channel (placement's
    ``Target.bias_values``, a Gemm's beta included, or a corrected bias);
    None reads a [N] bias's own values. A Gemm's beta becomes 1, since the
    values include it. A ``corrected`` bias gets no provenance: it differs
    from the float bias on purpose, so validation must not compare the two.
    """
    array = bias.const_value.numpy() if values is None else values  # type: ignore[union-attr]
    q, scales = quantize_bias(array, input_scale, weight_scales)
    base = bias.name or "bias"
    quantized = maker.initializer(f"{base}_quantized", q)
    scale = maker.initializer(f"{base}_scale", scales)
    zero = maker.initializer(f"{base}_zero_point", np.zeros(scales.shape, dtype=np.int32))
    _dequantize_into(maker, node, bias, [quantized, scale, zero], {"axis": 0}, ir.Shape(q.shape), record=not corrected)
    _unit_beta(node)


def _unit_beta(node: ir.Node) -> None:
    """Drops a Gemm's beta (default 1) once its C holds beta * C."""
    if node.op_type == "Gemm":
        node.attributes.pop("beta", None)


def _dequantize_into(
    maker: NodeMaker,
    node: ir.Node,
    original: ir.Value,
    inputs: list[ir.Value],
    attributes: dict,
    shape: ir.Shape | None = None,
    *,
    record: bool = True,
) -> None:
    """Puts DequantizeLinear(inputs) before ``node`` in place of ``original``, which is then dropped.

    ``shape`` is the dequantized tensor's, when it is not ``original``'s;
    ``record``: whether provenance pairs the result with ``original``.
    """
    base = original.name or "weight"
    dequantize = maker.node("DequantizeLinear", list(inputs), f"{base}_dequantized", attributes)
    _set_type(dequantize.outputs[0], ir.DataType.FLOAT, original.shape if shape is None else shape)
    maker.graph.insert_before(node, dequantize)
    for index, value in enumerate(node.inputs):
        if value is original:
            node.replace_input_with(index, dequantize.outputs[0])
    if record:
        maker.renames.append((dequantize.outputs[0].name or "", base))
    if not original.uses() and original.name in maker.graph.initializers:
        maker.graph.initializers.pop(original.name)


def _set_type(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = shape


def _int4() -> np.dtype:
    import ml_dtypes  # an onnx_ir dependency: the numpy type onnx_ir expects for INT4 data

    return np.dtype(ml_dtypes.int4)


def set_float_bias(maker: NodeMaker, node: ir.Node, bias: ir.Value | None, values: np.ndarray) -> None:
    """Gives ``node`` the float bias ``values`` ([N], a Gemm's beta included), replacing ``bias`` or adding one.

    With ``bias`` None, ``node`` (a Conv or Gemm) must have no input 2: the
    caller leaves alone a bias it cannot write per channel. A Gemm's beta becomes 1.
    """
    base = bias.name if bias is not None and bias.name else f"{node.name or node.op_type}_bias"
    value = maker.initializer(f"{base}_corrected", values.astype(np.float32))
    _unit_beta(node)
    if bias is None:
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            raise AssertionError(f"set_float_bias would drop the bias {node.inputs[2].name} of {node.name}")
        node.resize_inputs(3)
        node.replace_input_with(2, value)
        return
    for index, current in enumerate(node.inputs):
        if current is bias:
            node.replace_input_with(index, value)
    if not bias.uses() and bias.name in maker.graph.initializers:
        maker.graph.initializers.pop(bias.name)


def quantize_embedding(maker: NodeMaker, table: ir.Value, gathers: list[ir.Node]) -> tuple[int, int]:
    """Stores a Gather table as int8 rows with one scale per row; returns (bytes before, bytes after).

    Each ``Gather(table, ids)`` becomes ``Cast(Gather(q, ids)) * Gather(scales, ids)``,
    so only the gathered rows are dequantized (a DequantizeLinear before the
    Gather would dequantize the whole table on every run). The result keeps
    the Gather's output name.
    """
    array = table.const_value.numpy()  # type: ignore[union-attr]
    q, scales = quantize_per_channel(array, 0)
    base = table.name or "embedding"
    quantized = maker.initializer(f"{base}_quantized", q)
    row_scales = maker.initializer(f"{base}_scale", scales.reshape(-1, 1))
    for gather in gathers:
        ids, out = gather.inputs[1], gather.outputs[0]
        rows = maker.node("Gather", [quantized, ids], f"{out.name}_quantized", {"axis": 0})
        as_float = maker.node("Cast", [rows.outputs[0]], f"{out.name}_float", {"to": ir.DataType.FLOAT})
        row_scale = maker.node("Gather", [row_scales, ids], f"{out.name}_scale", {"axis": 0})
        multiply = ir.node("Mul", [as_float.outputs[0], row_scale.outputs[0]], name=maker.node_name(f"{out.name}_dequantize"))
        maker.graph.insert_before(gather, [rows, as_float, row_scale, multiply])
        out.replace_all_uses_with(multiply.outputs[0], replace_graph_outputs=True)
        name, shape, dtype = out.name, out.shape, out.type
        maker.graph.remove(gather, safe=True)
        multiply.outputs[0].name, multiply.outputs[0].shape, multiply.outputs[0].type = name, shape, dtype
    if not table.uses() and table.name in maker.graph.initializers:
        maker.graph.initializers.pop(table.name)
    return array.nbytes, q.nbytes + row_scales.const_value.nbytes  # type: ignore[union-attr]

