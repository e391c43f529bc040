"""Fold a constant Mul/Div/Add/Sub into the weights of the Conv/Gemm/MatMul before it.

``FoldElementwisePass``. Let ``y`` be the output of a Conv, Gemm or MatMul, which varies per
output channel ``j`` (axis 1 of Conv, the last axis of Gemm/MatMul), and ``v`` a constant that
broadcasts against ``y`` along that axis only (``[C,1,1]``, ``[1,C,1,1]``, ``[M]``, ``[1,M]``,
a scalar, ...). Then

- Conv ``y = W * x + b``: ``y * v = (W v_j) * x + b v``, ``y / v = (W / v_j) * x + b / v``,
  ``y + v = W * x + (b + v)``, ``y - v = W * x + (b - v)`` and ``v - y = (-W) * x + (v - b)``;
  W is scaled along axis 0; a missing bias counts as 0 and is created when needed.
- Gemm ``y = alpha A' B' + beta C``: Mul/Div scale the output columns of B (``B[:, j]`` when
  transB=0, ``B[j, :]`` when transB=1) and C; Add/Sub replace C by ``beta C +- v`` and set
  beta to 1; ``v - y`` also negates B.
- MatMul with a 2-D constant B: Mul/Div scale B's columns. Add/Sub are left to
  ``FuseMatMulAddPass`` (a MatMul has no bias to absorb them).

Legal only when: both ops are in the default domain; the constant is an initializer or
Constant-node value (not a graph input), finite, of the weight's float32/float64 type, and
broadcasts without growing ``y``'s shape (constants varying along batch or spatial axes are
left); a divisor has no zeros and ``v / y`` is never folded; weight and bias are constants
whose only use is the folded node (no other node sees them change); ``y`` has no other use,
is not a graph output and lives in the elementwise node's graph; Gemm needs opset >= 7.
The folded node's output takes the elementwise output's name, so no provenance is recorded.
New weights are computed in float64 and rounded once to the weight type: only the float
rounding order changes. Replaced weights, and a constant left without uses, are removed
here, not left to dce.

``FuseMatMulAddPass``: ``MatMul(A, B) + c`` becomes ``Gemm(A, B, c)`` (alpha = beta = 1) when
A is known to be 2-D, B is a 2-D constant (it may be shared: it is not changed), and c is a
constant of B's float type broadcastable as ``[N]``, ``[1, N]`` or a scalar. The MatMul
output must have no other use and not be a graph output; the Gemm output takes the Add
output's name. For 3-D or unknown-rank A the pattern is left alone: Gemm is 2-D only, and
onnxruntime fuses MatMul+Add itself (its MatMulAddFusion / FusedMatMul).
"""

from __future__ import annotations

__all__ = ["FoldElementwisePass", "FuseMatMulAddPass"]

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import GraphLike, apply_to_graphs
from graphopt.naming import NameAllocator

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_ELEMENTWISE_OPS = ("Mul", "Div", "Add", "Sub")
_FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Below opset 7 Gemm's C broadcasts only with the old ``broadcast`` attribute.
_GEMM_BROADCAST_OPSET = 7


class FoldElementwisePass(ir.passes.InPlacePass):
    """Fold Mul/Div/Add/Sub by a per-channel constant into Conv/Gemm/MatMul weights."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset(_ELEMENTWISE_OPS)

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameAllocator(model)
        opset = _default_opset(model)
        modified = _rewrite_nodes(model, lambda node: _try_fold(node, names, opset))
        return ir.passes.PassResult(model, modified)


class FuseMatMulAddPass(ir.passes.InPlacePass):
    """Turn a 2-D ``MatMul(A, B) + bias`` with constant B and bias into one Gemm."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset({"Add"})

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if _default_opset(model) < _GEMM_BROADCAST_OPSET:
            logger.debug("fuse-matmul-add: opset below %d; nothing fused", _GEMM_BROADCAST_OPSET)
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, _rewrite_nodes(model, _try_fuse_matmul_add))


def _rewrite_nodes(model: ir.Model, try_site: Callable[[ir.Node], bool]) -> bool:
    """Calls ``try_site`` on each node of every graph; True if any call rewrote."""

    def rewrite(graph: GraphLike) -> bool:
        changed = False
        for node in list(graph):
            # An earlier rewrite in this loop may have removed the node.
            if node.graph is not None:
                changed = try_site(node) or changed
        return changed

    return apply_to_graphs(model, rewrite)


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is an initializer or Constant output, else None."""
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    except (ValueError, OSError) as exc:  # a malformed Constant or unreadable data: not ours to fix
        logger.debug("fold-elementwise: cannot read %s (%s); left", value.name, exc)
        return None


def _sole_use_by(value: ir.Value | None, node: ir.Node) -> bool:
    """True when ``node`` is the one and only use of ``value``."""
    return value is not None and [user for user, _ in value.uses()] == [node]


def _per_channel(c: np.ndarray, *, axis: int, max_rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a ``[channels]`` vector if it broadcasts against the output along ``axis`` only.

    ``axis`` counts from the end (negative); a constant of higher rank than the
    output would grow the output and is rejected.
    """
    if c.ndim > max_rank:
        return None
    for index, size in enumerate(c.shape):
        if index - c.ndim == axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    flat = c.reshape(-1).astype(np.float64)
    # np.full, not np.broadcast_to: the latter costs ~10 us, paid once per fold.
    return flat if flat.size == channels else np.full(channels, flat[0])


def _match_site(node: ir.Node) -> tuple[ir.Node, ir.Value, np.ndarray, bool] | None:
    """(producer, constant value, its array, constant_first) for an elementwise node after a foldable op."""
    if node.op_type not in _ELEMENTWISE_OPS or node.domain not in _DEFAULT_DOMAINS:
        return None
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for position in (0, 1):
        y, other = node.inputs[position], node.inputs[1 - position]
        producer = y.producer() if y is not None else None
        if producer is None or producer.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if producer.domain not in _DEFAULT_DOMAINS or producer.graph is not node.graph:
            continue
        c = _constant(other)
        if c is not None and other is not None:
            return producer, other, c, position == 1
    return None


def _try_fold(node: ir.Node, names: NameAllocator, opset: int) -> bool:
    site = _match_site(node)
    if site is None:
        return False
    producer, constant, c, constant_first = site
    op, y = node.op_type, producer.outputs[0]
    if constant_first and op == "Div":
        logger.debug("fold-elementwise: %s divides a constant by %s; left", node.name, y.name)
        return False
    if not _sole_use_by(y, node) or y.is_graph_output():
        logger.debug("fold-elementwise: %s has other uses or is a graph output; left", y.name)
        return False
    if c.dtype not in _FLOAT_TYPES or not np.isfinite(c).all() or (op == "Div" and (c == 0).any()):
        logger.debug("fold-elementwise: %s: constant not finite float or a zero divisor; left", node.name)
        return False
    if producer.op_type == "Conv":
        plan = _plan_conv(producer, op, c, constant_first)
    elif producer.op_type == "Gemm":
        plan = _plan_gemm(producer, op, c, constant_first) if opset >= _GEMM_BROADCAST_OPSET else None
    else:
        plan = _plan_matmul(producer, op, c)
    if plan is None:
        return False
    new_inputs, attributes = plan
    _apply_plan(producer, new_inputs, attributes, names)
    _replace_by_producer_output(node, y, constant)
    logger.debug("fold-elementwise: folded %s into %s", node.op_type, producer.op_type)
    return True


def _weights(producer: ir.Node, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Weight (input 1) and optional bias (input 2), if constants of ``dtype`` used only by ``producer``."""
    arrays = []
    for value in producer.inputs[1:3]:
        array = _constant(value)
        if value is not None and (array is None or not _sole_use_by(value, producer) or array.dtype != dtype):
            logger.debug("fold-elementwise: %s of %s is not a constant used only there; left", value.name, producer.name)
            return None
        arrays.append(array)
    if not arrays or arrays[0] is None:
        return None
    return arrays[0], arrays[1] if len(arrays) > 1 else None


# A plan maps input index -> new array, plus attribute updates for the producer.
_Plan = tuple[dict[int, np.ndarray], dict[str, float]]


def _plan_conv(conv: ir.Node, op: str, c: np.ndarray, constant_first: bool) -> _Plan | None:
    arrays = _weights(conv, c.dtype)
    if arrays is None:
        return None
    w, b = arrays
    v = _per_channel(c, axis=1 - w.ndim, max_rank=w.ndim, channels=w.shape[0]) if w.ndim >= 3 else None
    if v is None:
        logger.debug("fold-elementwise: constant %s is not per output channel of %s; left", c.shape, conv.name)
        return None
    v_w = v.reshape((-1,) + (1,) * (w.ndim - 1))
    w64 = w.astype(np.float64)
    b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    new: dict[int, np.ndarray] = {}
    if op in ("Mul", "Div"):
        new[1] = w64 * v_w if op == "Mul" else w64 / v_w
        if b is not None:
            new[2] = b64 * v if op == "Mul" else b64 / v
    elif op == "Add":
        new[2] = b64 + v
    elif constant_first:  # v - (W*x + b) = (-W)*x + (v - b)
        new[1], new[2] = -w64, v - b64
    else:
        new[2] = b64 - v
    return {index: array.astype(w.dtype) for index, array in new.items()}, {}


def _plan_gemm(gemm: ir.Node, op: str, c: np.ndarray, constant_first: bool) -> _Plan | None:
    arrays = _weights(gemm, c.dtype)
    if arrays is None or arrays[0].ndim != 2:
        return None
    b, bias = arrays
    trans_b = gemm.attributes.get_int("transB", 0)
    beta = gemm.attributes.get_float("beta", 1.0)
    columns = b.shape[0] if trans_b else b.shape[1]
    v = _per_channel(c, axis=-1, max_rank=2, channels=columns)
    if v is None:
        logger.debug("fold-elementwise: constant %s is not per column of %s; left", c.shape, gemm.name)
        return None
    v_b = v[:, None] if trans_b else v[None, :]
    b64 = b.astype(np.float64)
    bias64 = None if bias is None else bias.astype(np.float64)
    new: dict[int, np.ndarray] = {}
    attributes: dict[str, float] = {}
    if op in ("Mul", "Div"):
        new[1] = b64 * v_b if op == "Mul" else b64 / v_b
        if bias64 is not None:
            new[2] = bias64 * v if op == "Mul" else bias64 / v
    else:
        # Fold beta into C so the added vector needs no division by beta.
        scaled = np.zeros(()) if bias64 is None else beta * bias64
        if op == "Add":
            new[2] = scaled + v
        elif constant_first:  # v - (alpha A B + beta C) = alpha A (-B) + (v - beta C)
            new[1], new[2] = -b64, v - scaled
        else:
            new[2] = scaled - v
        attributes["beta"] = 1.0
    return {index: array.astype(b.dtype) for index, array in new.items()}, attributes


def _plan_matmul(matmul: ir.Node, op: str, c: np.ndarray) -> _Plan | None:
    if op not in ("Mul", "Div"):  # no bias to absorb Add/Sub: FuseMatMulAddPass makes a Gemm
        logger.debug("fold-elementwise: %s after MatMul %s is left to fuse-matmul-add", op, matmul.name)
        return None
    arrays = _weights(matmul, c.dtype)
    if arrays is None or arrays[0].ndim != 2:
        return None
    b = arrays[0]
    # With a 2-D B the output has A's rank; if that is unknown, only constants
    # of rank <= 1 are sure not to grow the output.
    a = matmul.inputs[0]
    shape = matmul.outputs[0].shape or (a.shape if a is not None else None)
    out_rank = 1 if shape is None else len(shape)
    v = _per_channel(c, axis=-1, max_rank=out_rank, channels=b.shape[1])
    if v is None:
        logger.debug("fold-elementwise: constant %s is not per column of %s; left", c.shape, matmul.name)
        return None
    b64 = b.astype(np.float64)
    new_b = b64 * v[None, :] if op == "Mul" else b64 / v[None, :]
    return {1: new_b.astype(b.dtype)}, {}


def _apply_plan(
    producer: ir.Node, new_inputs: dict[int, np.ndarray], attributes: dict[str, float], names: NameAllocator
) -> None:
    for index, array in sorted(new_inputs.items()):
        old = producer.inputs[index] if len(producer.inputs) > index else None
        # A new bias is stored like the (possibly just replaced) weight: initializer or Constant node.
        like = old if old is not None else producer.inputs[1]
        assert like is not None
        base = old.name if old is not None and old.name else f"{like.name}_bias"
        value = _new_constant(like, producer, names.fresh(f"{base}_folded"), array)
        producer.resize_inputs(max(len(producer.inputs), index + 1))
        producer.replace_input_with(index, value)
        if old is not None:
            _drop_if_unused(old)
    for key, number in attributes.items():
        producer.attributes[key] = ir.AttrFloat32(key, number)


def _new_constant(like: ir.Value, anchor: ir.Node, name: str, array: np.ndarray) -> ir.Value:
    """A constant holding ``array``, stored where ``like`` is (initializer or Constant node)."""
    # ir.Tensor, not ir.tensor: the latter's Protocol checks cost ~60 us per call.
    tensor = ir.Tensor(array, name=name)
    if like.is_initializer() and isinstance(like.graph, ir.Graph):
        shape, dtype = ir.Shape(array.shape), ir.TensorType(tensor.dtype)
        value = ir.Value(name=name, shape=shape, type=dtype, const_value=tensor)
        like.graph.register_initializer(value)
        return value
    # Constant node (also the only choice inside functions): define it right before its user.
    constant = ir.node("Constant", [], attributes={"value": tensor})
    output = constant.outputs[0]
    output.name, output.shape, output.type = name, ir.Shape(array.shape), ir.TensorType(tensor.dtype)
    assert anchor.graph is not None
    anchor.graph.insert_before(anchor, constant)
    return output


def _drop_if_unused(value: ir.Value) -> None:
    """Removes an initializer or Constant node nothing reads any more."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.graph is not None and value.name is not None:
        value.graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


def _replace_by_producer_output(node: ir.Node, y: ir.Value, constant: ir.Value) -> None:
    """Drops the elementwise node; ``y`` (the folded node's output) takes over its output and name."""
    z = node.outputs[0]
    assert node.graph is not None
    z.replace_all_uses_with(y, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    _drop_if_unused(constant)
    y.name = z.name
    y.shape, y.type = z.shape or y.shape, z.type or y.type


def _try_fuse_matmul_add(node: ir.Node) -> bool:
    if node.op_type != "Add" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) != 2:
        return False
    for position in (0, 1):
        y, bias = node.inputs[position], node.inputs[1 - position]
        matmul = y.producer() if y is not None else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in _DEFAULT_DOMAINS:
            break
    else:
        return False
    assert y is not None and bias is not None
    if matmul.graph is not node.graph or not _sole_use_by(y, node) or y.is_graph_output():
        logger.debug("fuse-matmul-add: %s has other uses or is a graph output; left", y.name)
        return False
    a, b = matmul.inputs[0], matmul.inputs[1]
    if a is None or not _known_2d(a):
        logger.debug("fuse-matmul-add: %s: A is not known to be 2-D; left to onnxruntime", matmul.name)
        return False
    b_array, c = _constant(b), _constant(bias)
    if b_array is None or c is None or b_array.ndim != 2 or b_array.dtype != c.dtype or c.dtype not in _FLOAT_TYPES:
        logger.debug("fuse-matmul-add: %s: B or the bias is not a 2-D float constant of one type; left", matmul.name)
        return False
    if _per_channel(c, axis=-1, max_rank=2, channels=b_array.shape[1]) is None:
        logger.debug("fuse-matmul-add: bias %s is not per column of %s; left", c.shape, matmul.name)
        return False
    gemm = ir.node("Gemm", [a, b, bias], name=matmul.name or None)
    z, out = node.outputs[0], gemm.outputs[0]
    assert node.graph is not None
    node.graph.insert_before(node, gemm)
    z.replace_all_uses_with(out, replace_graph_outputs=True)
    node.graph.remove([node, matmul], safe=True)
    out.name, out.shape, out.type = z.name, z.shape, z.type
    logger.debug("fuse-matmul-add: fused %s and %s into Gemm", matmul.name, node.name)
    return True


def _known_2d(value: ir.Value) -> bool:
    """True when ``value`` is 2-D: by its recorded shape, or by what its producer always makes.

    Exported graphs often carry no shapes (nothing ran shape inference), but a
    Flatten or Gemm output is 2-D by definition, and a Reshape to a constant
    two-element shape is too.
    """
    if value.shape is not None:
        return len(value.shape) == 2
    producer = value.producer()
    if producer is None or producer.domain not in _DEFAULT_DOMAINS:
        return False
    if producer.op_type in ("Flatten", "Gemm"):
        return True
    if producer.op_type == "Reshape" and len(producer.inputs) > 1:
        target = _constant(producer.inputs[1])
        return target is not None and target.ndim == 1 and target.size == 2
    return False

