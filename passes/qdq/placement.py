"""Where QDQ goes: which nodes get int8 weights and which activations get Q/DQ pairs.

The placement follows onnxruntime's CPU fusion rules (shared/ORT_QDQ.md):

- **Targets** are Conv, MatMul and Gemm nodes of the main graph with a
  constant float weight that nothing else reads. Their activation input is
  quantized, their weight becomes int8 per channel, and a Conv's output is
  quantized too, because QLinearConv needs a trailing Q. When a Conv's only
  consumer is a Relu or Clip, the Q goes after that activation instead; the
  Q then makes the activation redundant and onnxruntime absorbs it.
- **Shared parameters.** Data-movement ops (MaxPool, Reshape, Transpose,
  ...) only drop their Q/DQ when input and output use identical parameters,
  so such an output reuses its input's range; all inputs of a Concat and its
  output share one range (the union), as the issue requires.
- Graph outputs stay float: a quantized tensor that is also a graph output
  keeps its float value there.
- If/Loop/Scan bodies and functions are left float, and ``Placement``
  says how many nodes that leaves.
- Custom-domain and unknown ops (graphopt.summary.is_opaque) are never
  targets and keep reading float tensors: a tensor gets a Q/DQ pair only
  when a standard op reads it, and only standard readers move onto the DQ.
- A weight, bias or embedding table holding NaN/Inf stays float, with the
  reason in ``skipped``: its max-abs scale would be NaN or Inf.
- **Bias.** A bias becomes int32 (and absorbs bias correction) only as one
  value per output channel: a Conv's B, a MatMul's [N] Add constant, or a
  Gemm's beta * C where C is the same on every row. Any other bias a layer
  reads (a Gemm C of [M, 1], a computed or shared one) stays as it is.
"""

from __future__ import annotations

__all__ = ["Target", "Placement", "plan", "representative", "TARGET_OPS", "weight_axis", "standard_readers"]

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.graphs import iter_graphs
from graphopt.summary import is_opaque
from passes.prune.layer_checks import GRAPH_INPUT_WEIGHT, behind_dequantize
from passes.qdq.summary import ALREADY_QUANTIZED

logger = logging.getLogger(__name__)

TARGET_OPS = ("Conv", "MatMul", "Gemm")
# Smaller Gather tables are not worth three extra nodes.
MIN_EMBEDDING_ELEMENTS = 4096
_ONNX_DOMAINS = ("", "ai.onnx")
_FLOAT = (ir.DataType.FLOAT,)
# Ops whose int8 form needs the same scale and zero point on input and output.
_SAME_PARAMS_OPS = frozenset(
    {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Expand", "Tile", "Resize"}
)
_ABSORBED_ACTIVATIONS = ("Relu", "Clip")
# Ops with an int8 kernel when every input has a DQ and the output a Q.
_INT8_KERNEL_OPS = frozenset({"Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"})


@dataclass(frozen=True)
class Target:
    """A node whose weight becomes int8; ``weight_axis`` is its per-channel axis."""

    node: ir.Node
    weight: ir.Value
    weight_axis: int
    bias: ir.Value | None
    # The node that reads the bias: the target itself, or the Add after a MatMul.
    bias_reader: ir.Node | None = None
    # What ``bias`` adds to each output channel ([N], a Gemm's beta and broadcast applied):
    # the values an int32 or corrected bias replacing it starts from.
    bias_values: np.ndarray | None = field(default=None, compare=False, repr=False)
    # The node reads a bias that cannot be written per channel (a Gemm C of [M, 1],
    # a computed or shared one): it stays as it is, and no correction replaces it.
    keeps_bias: bool = False


@dataclass
class Placement:
    """The plan: targets, activation tensors to quantize, and which tensors share parameters."""

    targets: list[Target] = field(default_factory=list)
    activations: list[ir.Value] = field(default_factory=list)
    # tensor name -> name of the tensor whose range it uses (its group's representative)
    shared: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    float_subgraph_nodes: int = 0
    # Embedding tables (float initializers read only by Gathers along axis 0) and their Gathers.
    embeddings: list[tuple[ir.Value, list[ir.Node]]] = field(default_factory=list)


def weight_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """The output-channel axis of ``node``'s weight, or None when per-channel does not apply."""
    if node.op_type == "Conv":
        return 0 if weight.ndim >= 3 else None
    if node.op_type == "MatMul":
        return 1 if weight.ndim == 2 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return None


def plan(model: ir.Model, *, exclude: Collection[str] = (), weight_only: bool = False) -> Placement:
    """Decides the targets and activation tensors of ``model``'s main graph.

    Args:
        model: The model, with weights lifted to initializers.
        exclude: Node names or op types to leave float.
        weight_only: Only weights (int4 weight-only mode): no activation Q/DQ,
            and only MatMul/Gemm targets.
    """
    graph = model.graph
    placement = Placement()
    for node in graph:
        target = _target(node, exclude, weight_only, placement)
        if target is not None:
            placement.targets.append(target)
    placement.float_subgraph_nodes = sum(len(g) for g in iter_graphs(model) if g is not graph)
    if placement.float_subgraph_nodes:
        logger.info("qdq: %d nodes in If/Loop/Scan bodies or functions stay float", placement.float_subgraph_nodes)
    if weight_only:
        return placement
    placement.embeddings = _embedding_tables(graph, exclude, placement)
    chosen: dict[str, ir.Value] = {}
    opsets = model.opset_imports
    for target in placement.targets:
        x = target.node.inputs[0]
        if x is not None and _is_float_activation(x):
            chosen.setdefault(x.name or "", x)
        if target.node.op_type == "Conv":
            out = _after_absorbed_activation(target.node.outputs[0])
            if _is_float_activation(out) and standard_readers(out, opsets):
                chosen.setdefault(out.name or "", out)
    _extend_to_int8_ops(graph, chosen, opsets)
    _extend_through_shared_ops(graph, chosen, placement.shared)
    order = {value: index for index, value in enumerate(v for node in graph for v in node.outputs)}
    placement.activations = sorted(chosen.values(), key=lambda v: order.get(v, -1))
    return placement


def standard_readers(value: ir.Value, opsets: Mapping[str, int]) -> list[tuple[ir.Node, int]]:
    """The ``(node, input index)`` uses of ``value`` by standard ops, the ones that may read a DequantizeLinear."""
    return [(user, index) for user, index in value.uses() if not is_opaque(user, opsets)]


def _nonfinite_reason(kind: str, value: ir.Value, array: np.ndarray) -> str | None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    return f"{kind} {value.name} has {bad} NaN/Inf values" if bad else None


def _embedding_tables(graph: ir.Graph, exclude: Collection[str], placement: Placement) -> list[tuple[ir.Value, list[ir.Node]]]:
    """Float 2-D initializers of at least ``MIN_EMBEDDING_ELEMENTS`` that only Gathers (axis 0) read, all finite."""
    tables: dict[str, tuple[ir.Value, list[ir.Node]]] = {}
    nonfinite: set[str] = set()
    for node in graph:
        if node.op_type != "Gather" or node.domain not in _ONNX_DOMAINS or "Gather" in exclude or node.name in exclude:
            continue
        table = node.inputs[0]
        if table is not None and (table.name in tables or table.name in nonfinite):
            continue
        array_ok = table is not None and table.const_value is not None and not table.is_graph_input()
        if not array_ok or table.const_value.dtype not in _FLOAT or len(table.const_value.shape) != 2:  # type: ignore[union-attr]
            continue
        if table.const_value.size < MIN_EMBEDDING_ELEMENTS or node.attributes.get_int("axis", 0) != 0:  # type: ignore[union-attr]
            continue
        readers = [user for user, index in table.uses()]
        if any(user.op_type != "Gather" or index != 0 or user.attributes.get_int("axis", 0) != 0 for user, index in table.uses()):
            continue
        if reason := _nonfinite_reason("embedding", table, table.const_value.numpy()):  # type: ignore[union-attr]
            placement.skipped.append((table.name or "", reason))
            nonfinite.add(table.name or "")
            continue
        tables[table.name or ""] = (table, list(dict.fromkeys(readers)))
    return list(tables.values())


def _target(node: ir.Node, exclude: Collection[str], weight_only: bool, placement: Placement) -> Target | None:
    if node.op_type not in TARGET_OPS or node.domain not in _ONNX_DOMAINS:
        return None
    label = node.name or node.op_type
    if weight_only and node.op_type == "Conv":
        return None
    if node.name in exclude or node.op_type in exclude:
        placement.skipped.append((label, "excluded"))
        return None
    if any(_from_dequantize(value) for value in node.inputs if value is not None):
        placement.skipped.append((label, ALREADY_QUANTIZED))
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = _constant_float(weight)
    if weight is None or array is None:
        placement.skipped.append((label, _no_weight_reason(node, weight)))
        return None
    if reason := _nonfinite_reason("weight", weight, array):
        placement.skipped.append((label, reason))
        return None
    if any(user is not node for user, _ in weight.uses()):
        placement.skipped.append((label, f"weight {weight.name} is shared with other nodes"))
        return None
    if node.op_type == "Gemm" and (
        node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0
    ):
        placement.skipped.append((label, "Gemm with transA or alpha != 1"))
        return None
    axis = weight_axis(node, array)
    if axis is None:
        placement.skipped.append((label, f"weight of rank {array.ndim} has no per-channel axis"))
        return None
    bias, reader, values = _bias(node, array.shape[axis])
    if bias is not None and (reason := _nonfinite_reason("bias", bias, bias.const_value.numpy())):  # type: ignore[union-attr]
        placement.skipped.append((label, reason))
        return None
    keeps_bias = bias is None and node.op_type != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None
    if keeps_bias:
        logger.debug("qdq: %s keeps its bias %s as it is (not one value per output channel)", label, node.inputs[2].name)  # type: ignore[union-attr]
    return Target(node, weight, axis, bias, reader, values, keeps_bias)


def _no_weight_reason(node: ir.Node, weight: ir.Value | None) -> str:
    """Why ``node``'s input 1 is no weight qdq quantizes."""
    if _is_constant(weight):
        # Constant but another type (float16, double): no int8 path from it is built.
        return f"weight is {weight.const_value.dtype.name.lower()}, not float32"  # type: ignore[union-attr]
    if node.op_type != "Conv" and _is_constant(node.inputs[0]):
        # W @ x: its per-channel scales would go per row of A, and onnxruntime's int8
        # MatMul takes per-channel scales on B only (per column); qdq's weights are per channel.
        return "constant is the left operand: not a weight layout qdq quantizes"
    if weight is not None and weight.const_value is not None and weight.is_graph_input():
        return GRAPH_INPUT_WEIGHT
    if behind_dequantize(weight):
        return "weight is already quantized (behind DequantizeLinear)"
    if weight is not None and weight.const_value is None:
        # attention's Q @ K^T and weights @ V: onnxruntime has no fused int8 kernel for two activations here.
        return "no constant weight (both operands are computed, as attention's are)"
    return "weight is not a float initializer"


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _bias(node: ir.Node, channels: int) -> tuple[ir.Value | None, ir.Node | None, np.ndarray | None]:
    """The bias when it can become int32 (one float per output channel), its reader, and its [channels] values.

    A MatMul's bias is the constant of the Add that alone reads its output:
    onnxruntime fuses MatMul+Add into a Gemm before its int8 rules run, and
    that Gemm becomes QGemm only with an int32 bias. That Add's constant
    must be [N] already: a [1, N] one would broadcast the output to rank 2.
    A Gemm adds beta * C broadcast to [M, N]: a C that is the same on every
    row (scalar, [N], [1, N]) is the vector beta * C, which replaces C
    once beta is reset to 1; a C that varies by row ([M, 1], [M, N]) is not.
    """
    reader, bias = node, None
    if node.op_type == "MatMul":
        users = node.outputs[0].uses()
        if len(users) == 1 and not node.outputs[0].is_graph_output():
            add = next(iter(users)).node
            if add.op_type == "Add" and add.domain in _ONNX_DOMAINS and len(add.inputs) == 2:
                reader, bias = add, add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    elif len(node.inputs) > 2:
        bias = node.inputs[2]
    array = _constant_float(bias)
    if bias is None or array is None or any(user is not reader for user, _ in bias.uses()):
        return None, None, None
    if node.op_type != "Gemm":
        return (bias, reader, array) if array.shape == (channels,) else (None, None, None)
    row = array.reshape(-1) if array.ndim < 2 or array.shape[0] == 1 else None
    if row is None or array.ndim > 2 or row.size not in (1, channels):
        return None, None, None
    beta = np.float32(node.attributes.get_float("beta", 1.0))
    return bias, reader, (beta * np.broadcast_to(row, (channels,))).astype(np.float32)


def _constant_float(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.is_graph_input() or value.const_value is None:
        return None
    if value.const_value.dtype not in _FLOAT:
        return None
    return value.const_value.numpy()


def _from_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def _into_quantize(value: ir.Value) -> bool:
    """Whether only QuantizeLinear reads ``value``: a model through qdq before, whose readers moved to the DQ."""
    users = value.uses()
    return bool(users) and all(user.op_type == "QuantizeLinear" and user.domain in _ONNX_DOMAINS for user, _ in users)


def _is_float_activation(value: ir.Value) -> bool:
    if value.const_value is not None or _from_dequantize(value) or _into_quantize(value):
        return False
    return value.type is None or value.dtype in _FLOAT


def _after_absorbed_activation(value: ir.Value) -> ir.Value:
    """``value``, or the output of the Relu/Clip that is its only consumer."""
    users = value.uses()
    if len(users) == 1 and not value.is_graph_output():
        user = next(iter(users)).node
        if user.op_type in _ABSORBED_ACTIVATIONS and user.domain in _ONNX_DOMAINS:
            return user.outputs[0]
    return value


def _extend_to_int8_ops(graph: ir.Graph, chosen: dict[str, ir.Value], opsets: Mapping[str, int]) -> None:
    """Quantizes the outputs of ops that have int8 kernels once all their float inputs are quantized.

    Add, Mul, Concat and the average pools become their QLinear forms, and
    data-movement ops (MaxPool, Reshape, ...) run on 8-bit data, but only
    with a Q on the output too; without it they would run in float between a
    DQ and a Q, which costs more than not quantizing. Visited in graph
    order, so a chain of such ops is quantized end to end.
    """
    for node in graph:
        if node.domain not in _ONNX_DOMAINS or not node.outputs:
            continue
        if node.op_type not in _INT8_KERNEL_OPS and node.op_type not in _SAME_PARAMS_OPS:
            continue
        activations = [v for v in node.inputs if v is not None and v.const_value is None]
        if not activations or any(v.name not in chosen for v in activations):
            continue
        out = _after_absorbed_activation(node.outputs[0])
        if _is_float_activation(out) and standard_readers(out, opsets):
            chosen.setdefault(out.name or "", out)


def _extend_through_shared_ops(graph: ir.Graph, chosen: dict[str, ir.Value], shared: dict[str, str]) -> None:
    """Ties data-movement outputs to their inputs, and Concat inputs to one another."""
    for node in graph:
        if node.domain not in _ONNX_DOMAINS or not node.outputs or not node.inputs or node.inputs[0] is None:
            continue
        out = node.outputs[0]
        if node.op_type in _SAME_PARAMS_OPS and out.name in chosen and node.inputs[0].name in chosen:
            _tie(shared, out.name or "", node.inputs[0].name or "")
        elif node.op_type == "Concat" and out.name in chosen:
            for value in node.inputs:
                if value is not None and _is_float_activation(value):
                    chosen.setdefault(value.name or "", value)
                    _tie(shared, value.name or "", out.name or "")


def _tie(shared: dict[str, str], name: str, other: str) -> None:
    """Puts ``name`` and ``other`` in one group (union by representative)."""
    root_a, root_b = _root(shared, name), _root(shared, other)
    if root_a != root_b:
        shared[root_a] = root_b


def _root(shared: dict[str, str], name: str) -> str:
    while name in shared:
        name = shared[name]
    return name


def representative(placement: Placement, name: str) -> str:
    """The tensor whose calibrated range ``name`` uses (itself unless tied to others)."""
    return _root(placement.shared, name)
