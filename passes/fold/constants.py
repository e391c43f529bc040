"""Constant folding: evaluate nodes whose inputs are all known and store the result.

A node ``y = op(c1, ..., cn)`` whose inputs are constants computes the same
tensor on every run, so ``y`` can be stored as an initializer named ``y`` and
the node removed; consumers, outputs and names are unchanged, so the rewrite
is exact up to the evaluator's float rounding (well inside rtol 1e-5). A value
is constant when it is an initializer that is not a graph input (an input can
be overridden by the caller), the output of a Constant node, or a value folded
earlier in this run. Nodes are visited in graph order, which ONNX requires to
be topological, so a chain such as ``Add(Mul(c1, c2), c3)`` folds in one run.
Outer-scope constants count inside If/Loop/Scan bodies; the folded tensor
becomes an initializer of the body that held the node.

``Shape`` and ``Size`` also fold when their input is not constant but its
shape is fully static: ``Shape(x)[start:end]`` (opset 15 ``start``/``end``,
clamped like Python slicing) and ``Size(x) = prod(shape(x))``.

Left alone, each logged at DEBUG:

- Quantize/DequantizeLinear (folding them would undo quantization), ops with
  a body (If/Loop/Scan), random ops, Constant itself (``lift-constants``'s
  job) and custom domains;
- a Cast of an 8-bit-or-narrower integer initializer to a float type: the
  widening of weights stored as int8 (qdq's int8 storage, passes/qdq/storage.py).
  Folding it would undo the compression and gain nothing, since onnxruntime
  folds it itself when a session opens;
- nodes with an output that is a graph output (an initializer cannot be one
  without also becoming an input in older IR versions), and nodes with an
  omitted optional output (``""``, as in ``"", Y_h = LSTM(...)``);
- string tensors, sequences, maps and optionals (an initializer is a
  tensor), and nodes neither evaluator can run;
- growth: nodes whose outputs would take more than
  ``max(max_output_bytes, max_growth * input bytes)``. ConstantOfShape, Tile,
  Expand and Range are sized before being evaluated, so a 10^12-element
  request is never allocated;
- every graph of a model whose IR version is below 4 (initializers must also
  be graph inputs there), and functions (they cannot hold initializers).

Inputs left unused by a fold stay as initializers; ``dce`` removes them.
"""

from __future__ import annotations

__all__ = ["FoldConstantsPass"]

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort

from graphopt.graphs import GraphLike, apply_to_graphs

logger = logging.getLogger(__name__)

_NEVER_FOLD = frozenset(
    {
        "Constant",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
_STORED_INTEGERS = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
# Ops whose output size follows from their (constant) inputs without running them.
_SIZED_BEFORE_EVALUATION = frozenset({"ConstantOfShape", "Tile", "Expand", "Range"})
# IR versions below this one require each initializer to be a graph input.
_IR_VERSION_SEPARATE_INITIALIZERS = 4


class FoldConstantsPass(ir.passes.InPlacePass):
    """Replace nodes computed only from constants by initializers of the same name."""

    visits_subgraphs = True

    def __init__(self, *, max_growth: float = 4.0, max_output_bytes: int = 1 << 20) -> None:
        """Args:
        max_growth: Fold a node whose outputs exceed ``max_output_bytes`` only
            if they take at most this many times its inputs' bytes.
        max_output_bytes: Outputs up to this many bytes always fold.
        """
        super().__init__()
        if isinstance(max_growth, bool) or not isinstance(max_growth, (int, float)) or not max_growth > 0:
            raise ValueError(f"max_growth must be a positive number, got {max_growth!r}")
        if isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) or max_output_bytes < 0:
            raise ValueError(f"max_output_bytes must be a non-negative int, got {max_output_bytes!r}")
        self.max_growth = float(max_growth)
        self.max_output_bytes = max_output_bytes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.ir_version < _IR_VERSION_SEPARATE_INITIALIZERS:
            logger.debug("fold-constants: IR version %d < 4; left", model.ir_version)
            return ir.passes.PassResult(model, False)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))

        def fold_graph(graph: GraphLike) -> bool:
            folded = 0
            for node in list(graph):
                if self._try_fold(node, opset):
                    folded += 1
            if folded:
                logger.debug("fold-constants: folded %d nodes in graph %s", folded, graph.name)
            return folded > 0

        return ir.passes.PassResult(model, apply_to_graphs(model, fold_graph, functions=False))

    def _try_fold(self, node: ir.Node, opset: int) -> bool:
        # Cheapest test first: most nodes of a real graph read a non-constant.
        if node.op_type not in ("Shape", "Size") and not _all_inputs_constant(node):
            return False
        if not _foldable_op(node):
            return False
        if any(output.is_graph_output() for output in node.outputs):
            logger.debug("fold-constants: %s feeds a graph output; left", node.name or node.op_type)
            return False
        if not all(output.name for output in node.outputs):
            # An unnamed (omitted optional) output cannot become an initializer.
            logger.debug("fold-constants: %s has an omitted optional output; left", node.name or node.op_type)
            return False
        if any(output.type is not None and not isinstance(output.type, ir.TensorType) for output in node.outputs):
            # Initializers are tensors; a sequence or optional output cannot become one.
            logger.debug("fold-constants: %s writes a sequence or optional; left", node.name or node.op_type)
            return False
        arrays = _static_shape_result(node, opset)
        if arrays is None:
            arrays = self._evaluate_if_small(node, opset)
        if arrays is None:
            return False
        _replace_with_initializers(node, arrays)
        return True

    def _evaluate_if_small(self, node: ir.Node, opset: int) -> list[np.ndarray] | None:
        inputs = _constant_inputs(node)
        if inputs is None:
            return None
        limit = max(self.max_output_bytes, self.max_growth * sum(a.nbytes for a in inputs if a is not None))
        if node.op_type in _SIZED_BEFORE_EVALUATION:
            predicted = _predicted_bytes(node, inputs)
            if predicted is None or predicted > limit:
                logger.debug(
                    "fold-constants: %s would take %s bytes (limit %d); left", node.op_type, predicted, limit
                )
                return None
        arrays = _evaluate(node, inputs, opset)
        if arrays is None:
            return None
        if sum(a.nbytes for a in arrays) > limit:
            logger.debug("fold-constants: %s output exceeds %d bytes; left", node.op_type, limit)
            return None
        for output, array in zip(node.outputs, arrays):
            if array.dtype == object or (output.dtype is not None and output.dtype != _dtype_of(array)):
                logger.debug("fold-constants: %s gives an unexpected dtype %s; left", output.name, array.dtype)
                return None
        return arrays


def _foldable_op(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx"):
        logger.debug("fold-constants: custom domain %s.%s; left", node.domain, node.op_type)
        return False
    if node.op_type in _NEVER_FOLD or _widens_stored_integers(node):
        return False
    for attr in node.attributes.data.values():  # UserDict.data: the plain dict, cheaper to walk
        if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return False
    return True


def _widens_stored_integers(node: ir.Node) -> bool:
    """A Cast from an 8-bit-or-narrower integer constant to a float type (see the module docstring)."""
    if node.op_type != "Cast" or not node.inputs or node.inputs[0] is None:
        return False
    source, to = node.inputs[0].dtype, node.attributes.get_int("to", 0)
    return source in _STORED_INTEGERS and to in _FLOATS


def _all_inputs_constant(node: ir.Node) -> bool:
    """True when every present input is an initializer or a Constant output, and one is present.

    Looks at metadata only; ``_constant_inputs`` reads the arrays afterwards.
    """
    present = [value for value in node.inputs if value is not None]
    if not present:
        return False
    for value in present:
        if value.const_value is not None and not value.is_graph_input():
            continue
        producer = value.producer()
        if producer is None or producer.op_type != "Constant":
            return False
    return True


def _static_shape_result(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    """Shape/Size of a value whose shape is all integers, without running anything."""
    if node.op_type not in ("Shape", "Size") or not node.inputs or node.inputs[0] is None:
        return None
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(dim, int) for dim in shape):
        return None
    dims = [int(dim) for dim in shape]
    if node.op_type == "Size":
        return [np.array(math.prod(dims), dtype=np.int64)]
    start, end = 0, None
    if opset >= 15:
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
    # Python slicing clamps out-of-range and negative bounds exactly as Shape-15 specifies.
    return [np.array(dims[start:end], dtype=np.int64)]


def _constant_inputs(node: ir.Node) -> list[np.ndarray | None] | None:
    """The inputs as arrays (None for omitted optional inputs), or None if one is not constant."""
    arrays: list[np.ndarray | None] = []
    for value in node.inputs:
        if value is None:
            arrays.append(None)
            continue
        if value.is_graph_input():
            return None
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:  # a malformed Constant node
            return None
        if tensor is None or tensor.dtype == ir.DataType.STRING:
            return None
        arrays.append(tensor.numpy())
    if all(array is None for array in arrays):
        return None
    return arrays


def _predicted_bytes(node: ir.Node, inputs: Sequence[np.ndarray | None]) -> int | None:
    """Output bytes of ConstantOfShape/Tile/Expand/Range computed from their inputs alone."""
    try:
        if node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            itemsize = attr.as_tensor().dtype.itemsize if attr is not None else 4
            return math.prod(int(d) for d in inputs[0].reshape(-1)) * itemsize  # type: ignore[union-attr]
        data = inputs[0]
        assert data is not None
        if node.op_type == "Tile":
            return data.nbytes * math.prod(int(r) for r in inputs[1].reshape(-1))  # type: ignore[union-attr]
        if node.op_type == "Expand":
            shape = np.broadcast_shapes(data.shape, tuple(int(d) for d in inputs[1].reshape(-1)))  # type: ignore[union-attr]
            return math.prod(shape) * data.itemsize
        start, limit, delta = (a.reshape(()).item() for a in inputs)  # type: ignore[union-attr]
        return max(math.ceil((limit - start) / delta), 0) * data.itemsize
    except (ValueError, TypeError, ZeroDivisionError, IndexError, AssertionError, AttributeError):
        return None


def _evaluate(node: ir.Node, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """Runs ``node`` alone. None when neither evaluator can."""
    proto, feeds = _one_node_model(node, inputs, opset)
    # onnx's reference evaluator implements every standard op at every opset,
    # including ones onnxruntime has no CPU kernel for at some opset or dtype;
    # it has gaps and bugs of its own (and raises on them), and onnxruntime
    # covers most of those, so it is the fallback.
    try:
        results = onnx.reference.ReferenceEvaluator(proto).run(None, feeds)
        if not all(isinstance(r, (np.ndarray, np.generic)) for r in results):
            # A sequence (list), map or empty optional: np.asarray would stack it into a tensor of another type.
            logger.debug("fold-constants: %s gives a sequence, map or optional; left", node.op_type)
            return None
        return [np.asarray(r) for r in results]
    except Exception as exc:  # the evaluator raises many types; any means "cannot run here"
        logger.debug("fold-constants: reference evaluator failed on %s (%s); trying onnxruntime", node.op_type, exc)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [np.asarray(r) for r in session.run(None, feeds)]
    except Exception as exc:  # onnxruntime's errors share no base class worth naming
        logger.debug("fold-constants: onnxruntime failed on %s (%s); left", node.op_type, exc)
        return None


def _one_node_model(
    node: ir.Node, inputs: Sequence[np.ndarray | None], opset: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    node_proto = ir.serde.serialize_node(node)
    feeds: dict[str, np.ndarray] = {}
    graph_inputs = []
    for name, array in zip(node_proto.input, inputs):
        if array is None or name in feeds:
            continue
        feeds[name] = array
        elem_type = ir.DataType.from_numpy(array.dtype).value
        graph_inputs.append(onnx.helper.make_tensor_value_info(name, elem_type, array.shape))
    graph_outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in node_proto.output if name]
    graph = onnx.helper.make_graph([node_proto], "fold", graph_inputs, graph_outputs)
    domain = node.domain or ""
    opsets = [onnx.helper.make_opsetid(domain, opset)]
    # The oldest IR version that carries this opset, not onnx's newest: an
    # onnxruntime older than the installed onnx refuses IR versions it predates.
    ir_version = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    return model, feeds


def _dtype_of(array: np.ndarray) -> ir.DataType | None:
    try:
        return ir.DataType.from_numpy(array.dtype)
    except TypeError:
        return None


def _replace_with_initializers(node: ir.Node, arrays: Sequence[np.ndarray]) -> None:
    graph = node.graph
    assert graph is not None
    replacements = []
    for output, array in zip(node.outputs, arrays):
        name = output.name
        dtype = _dtype_of(array)
        assert dtype is not None
        # ir.Tensor, not ir.tensor: the latter's Protocol checks cost ~60 us per call.
        tensor = ir.Tensor(array, dtype=dtype, name=name)
        replacement = ir.Value(
            shape=ir.Shape(array.shape),
            type=ir.TensorType(dtype),
            const_value=tensor,
            metadata_props=output.metadata_props.copy(),
        )
        output.replace_all_uses_with(replacement)
        replacements.append((name, replacement))
    graph.remove(node, safe=True)
    # Named only now: the removed node's outputs held these names until here.
    for name, replacement in replacements:
        replacement.name = name
        graph.register_initializer(replacement)
