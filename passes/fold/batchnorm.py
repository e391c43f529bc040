"""Fold inference-mode BatchNormalization into the weights that feed it.

In inference mode (``training_mode`` absent or 0, only output ``Y`` used),
BatchNormalization over channel axis 1 is a per-channel affine map::

    y = scale * (x - mean) / sqrt(var + eps) + B = s * x + t
    s = scale / sqrt(var + eps),   t = B - mean * s

Rewrites, both exact up to float rounding (the constants are computed in
float64 and cast once to the weight's type):

1. **Fold into the producer.** When ``x`` is the only use of the output of a
   Conv, ConvTranspose, Gemm or MatMul whose weight is a constant used by that
   node alone, the BN disappears:

   - Conv, W ``[C_out, C_in/g, k...]``: ``W'[o] = W[o] * s[o]``,
     ``b' = (b - mean) * s + B`` (``b = 0`` when absent).
   - ConvTranspose, W ``[C_in, C_out/g, k...]``: output channel
     ``gi * C_out/g + j`` is computed by slice ``W[gi*C_in/g : (gi+1)*C_in/g, j]``,
     so W is viewed as ``[g, C_in/g, C_out/g, k...]`` and scaled along axis 2.
   - Gemm ``alpha * A' B' + beta * C``: B is scaled along its output axis
     (axis 1, or axis 0 with ``transB=1``); ``C' = beta * C * s + t`` and
     ``beta`` becomes 1. Its output is always 2-D, so axis 1 is the last axis.
   - MatMul with a 2-D constant B and a 2-D output ``[M, N]`` (rank must be
     known): ``B' = B * s`` along axis 1, followed by ``Add(t)``. A higher-rank
     output would put the BN channel on a non-last axis, so it is not folded.

   Legal because the producer's output had no other reader and is not a graph
   output, and the weight has no other reader, so nothing else sees the change.
   The folded output takes the BN output's name (kept even when it is a graph
   output); the producer's old output no longer exists in the new graph. The
   MatMul's intermediate gets a fresh name, since it no longer equals the
   original MatMul output.

2. **Standalone** (option ``standalone``, default on): any other inference BN
   whose input rank is known becomes ``Add(Mul(x, s_r), t_r)`` with ``s`` and
   ``t`` reshaped to ``[C, 1, ..., 1]`` for that rank, so later elementwise
   folding can continue. The Add output keeps the BN output's name.

Not touched (logged at DEBUG): custom domains, training mode or used
mean/var outputs, ``spatial=0`` (opset < 9), opsets below 7, non-float types,
BN parameters that are not readable constants, weights that are graph inputs
or shared. New constants are initializers of the rewritten node's graph, or
Constant nodes inside functions and IR < 4 models. Initializers and Constant
nodes the rewrite leaves without uses are removed here, not left to ``dce``.
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graphopt.graphs import GraphLike, apply_to_graphs
from graphopt.naming import NameAllocator

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Before opset 7 BatchNormalization had is_test/consumed_inputs semantics.
_MIN_OPSET = 7
# IR versions below this one require each initializer to be a graph input.
_IR_VERSION_SEPARATE_INITIALIZERS = 4


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference BatchNormalization into Conv/ConvTranspose/Gemm/MatMul, else into Mul+Add."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset({"BatchNormalization"})

    def __init__(self, *, standalone: bool = True) -> None:
        """Args:
        standalone: Also rewrite a BN that cannot be folded into its producer
            as Mul + Add (True or False).
        """
        super().__init__()
        if not isinstance(standalone, bool):
            raise ValueError(f"standalone must be True or False, got {standalone!r}")
        self.standalone = standalone

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        context = _Context(model=model, names=NameAllocator(model), standalone=self.standalone)
        modified = apply_to_graphs(model, context.rewrite_graph)
        return ir.passes.PassResult(model, modified)


@dataclasses.dataclass
class _Context:
    """Per-run state: the model, the names in use, and per-graph settings."""

    model: ir.Model
    names: NameAllocator
    standalone: bool
    opset: int = 0
    use_initializers: bool = True

    def rewrite_graph(self, graph: GraphLike) -> bool:
        default = self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 0))
        is_function = isinstance(graph, ir.Function)
        opset = graph.opset_imports.get("", default) if is_function else default
        legacy = self.model.ir_version < _IR_VERSION_SEPARATE_INITIALIZERS
        site = dataclasses.replace(self, opset=opset, use_initializers=not is_function and not legacy)
        modified = False
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            params = _bn_params(node, site)
            if params is None:
                continue
            if _try_fold_into_producer(node, params, site):
                modified = True
            elif site.standalone and _try_standalone(node, params, site):
                modified = True
        return modified

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def constant(self, anchor: ir.Node, base: str, array: np.ndarray) -> ir.Value:
        """A new constant holding ``array``, visible to ``anchor``."""
        name = self.fresh(base)
        # ir.Tensor, not ir.tensor: the latter's Protocol checks cost ~60 us per call.
        tensor = ir.Tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        graph = anchor.graph
        assert graph is not None
        if self.use_initializers:
            value.const_value = tensor
            graph.register_initializer(value)
            return value
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)], outputs=[value])
        graph.insert_before(anchor, node)
        return value


@dataclasses.dataclass(frozen=True)
class _BnParams:
    scale: np.ndarray  # s, float64 [C]
    shift: np.ndarray  # t, float64 [C]
    inputs: tuple[ir.Value, ...]  # scale, B, mean, var: removed when unused


def _read(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value``, or None when it is not a readable constant."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except (OSError, ValueError) as exc:
        logger.debug("fold-batchnorm: cannot read %s (%s); left", value.name, exc)
        return None


def _bn_params(node: ir.Node, ctx: _Context) -> _BnParams | None:
    """s and t of an inference-mode BN, or None when the BN must stay."""
    attrs = node.attributes
    if ctx.opset < _MIN_OPSET or attrs.get_int("spatial", 1) != 1 or attrs.get_int("training_mode", 0) != 0:
        logger.debug("fold-batchnorm: %s is not an inference BN of opset 7+; left", node.name)
        return None
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        logger.debug("fold-batchnorm: %s has used mean/var outputs; left", node.name)
        return None
    if len(node.inputs) != 5:
        return None
    arrays = [_read(value) for value in node.inputs[1:]]
    if any(a is None or a.ndim != 1 or a.dtype.kind != "f" for a in arrays):
        logger.debug("fold-batchnorm: %s has non-constant or non-float parameters; left", node.name)
        return None
    scale, bias, mean, var = (np.asarray(a, dtype=np.float64) for a in arrays)  # type: ignore[arg-type]
    if not scale.shape == bias.shape == mean.shape == var.shape:
        return None
    epsilon = attrs.get_float("epsilon", 1e-5)
    s = scale / np.sqrt(var + epsilon)
    return _BnParams(scale=s, shift=bias - mean * s, inputs=tuple(node.inputs[1:]))  # type: ignore[arg-type]


def _try_fold_into_producer(bn: ir.Node, params: _BnParams, ctx: _Context) -> bool:
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None or producer.op_type not in _PRODUCERS or producer.domain not in ("", "ai.onnx"):
        return False
    if producer.graph is not bn.graph or len(x.uses()) != 1 or x.is_graph_output():
        logger.debug("fold-batchnorm: %s is read outside %s or crosses graphs; not folded", x.name, bn.name)
        return False
    if len(producer.inputs) < 2 or not _owned_weight(producer.inputs[1], producer):
        return False
    tensor = ir.convenience.get_const_tensor(producer.inputs[1])  # type: ignore[arg-type]
    # The constant's own type: values made by Constant nodes often carry none.
    if tensor is None or tensor.dtype not in _FLOAT_TYPES:
        return False
    folders = {
        "Conv": _fold_conv,
        "ConvTranspose": _fold_conv_transpose,
        "Gemm": _fold_gemm,
        "MatMul": _fold_matmul,
    }
    old = [value for value in producer.inputs[1:] if value is not None]
    folded = folders[producer.op_type](producer, params, ctx)
    if folded is None:
        return False
    _replace_bn(bn, folded)
    _drop_unused([*params.inputs, *old])
    logger.debug("fold-batchnorm: folded %s into %s", bn.name, producer.name)
    return True


def _owned_weight(weight: ir.Value | None, node: ir.Node) -> bool:
    """The weight is a readable constant that only ``node`` reads, as its input 1."""
    if weight is None or weight.is_graph_input() or weight.is_graph_output():
        return False
    if any(use.node is not node or use.idx != 1 for use in weight.uses()):
        logger.debug("fold-batchnorm: weight %s is shared; not folded", weight.name)
        return False
    return ir.convenience.get_const_tensor(weight) is not None


def _fold_conv(node: ir.Node, params: _BnParams, ctx: _Context) -> ir.Value | None:
    weight = _read(node.inputs[1])
    if weight is None or weight.ndim < 2 or weight.shape[0] != params.scale.size:
        return None
    spatial = (1,) * (weight.ndim - 1)
    new_weight = weight * params.scale.reshape(-1, *spatial)
    return _set_weight_and_bias(node, params, ctx, new_weight.astype(weight.dtype))


def _fold_conv_transpose(node: ir.Node, params: _BnParams, ctx: _Context) -> ir.Value | None:
    weight = _read(node.inputs[1])
    group = node.attributes.get_int("group", 1)
    if weight is None or weight.ndim < 2 or group < 1 or weight.shape[0] % group:
        return None
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    if c_out_per_group * group != params.scale.size:
        return None
    # Output channel gi * C_out/g + j reads W[gi-th block of C_in/g rows, j].
    kernel = weight.shape[2:]
    grouped = weight.reshape(group, c_in // group, c_out_per_group, *kernel)
    factors = params.scale.reshape(group, 1, c_out_per_group, *(1,) * len(kernel))
    new_weight = (grouped * factors).reshape(weight.shape)
    return _set_weight_and_bias(node, params, ctx, new_weight.astype(weight.dtype))


def _set_weight_and_bias(node: ir.Node, params: _BnParams, ctx: _Context, weight: np.ndarray) -> ir.Value | None:
    """Conv/ConvTranspose: W' given (in the weight's type), b' = b * s + t."""
    old_weight = node.inputs[1]
    assert old_weight is not None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = np.zeros(params.scale.size) if bias_value is None else _read(bias_value)
    if bias is None or bias.shape != params.scale.shape:
        return None
    dtype = weight.dtype
    new_weight = ctx.constant(node, f"{old_weight.name}_bnfold", weight)
    new_bias = (bias * params.scale + params.shift).astype(dtype)
    new_bias_value = ctx.constant(node, f"{node.outputs[0].name}_bnfold_bias", new_bias)
    node.replace_input_with(1, new_weight)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, new_bias_value)
    return node.outputs[0]


def _fold_gemm(node: ir.Node, params: _BnParams, ctx: _Context) -> ir.Value | None:
    b = _read(node.inputs[1])
    trans_b = node.attributes.get_int("transB", 0)
    if b is None or b.ndim != 2 or b.shape[0 if trans_b else 1] != params.scale.size:
        return None
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    c = np.zeros(()) if c_value is None else _read(c_value)
    if c is None or c.ndim > 2 or c.shape[-1:] not in ((), (1,), params.scale.shape):
        logger.debug("fold-batchnorm: Gemm %s has a non-constant or odd-shaped C; not folded", node.name)
        return None
    beta = node.attributes.get_float("beta", 1.0)
    factors = params.scale.reshape(-1, 1) if trans_b else params.scale.reshape(1, -1)
    # beta * C is scaled along the last (channel) axis; beta is folded into C'.
    new_c = np.asarray(beta * c, dtype=np.float64) * params.scale + params.shift
    old_b = node.inputs[1]
    assert old_b is not None
    dtype = b.dtype
    new_b = ctx.constant(node, f"{old_b.name}_bnfold", (b * factors).astype(dtype))
    new_c_value = ctx.constant(node, f"{node.outputs[0].name}_bnfold_bias", new_c.astype(dtype))
    node.replace_input_with(1, new_b)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, new_c_value)
    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return node.outputs[0]


def _fold_matmul(node: ir.Node, params: _BnParams, ctx: _Context) -> ir.Value | None:
    b = _read(node.inputs[1])
    a, out = node.inputs[0], node.outputs[0]
    ranks = {v.shape.rank() for v in (a, out) if v is not None and v.shape is not None}
    if b is None or b.ndim != 2 or b.shape[1] != params.scale.size or ranks != {2}:
        logger.debug("fold-batchnorm: MatMul %s is not 2-D x 2-D constant; not folded", node.name)
        return None
    old_b = node.inputs[1]
    assert old_b is not None
    dtype = b.dtype
    new_b = ctx.constant(node, f"{old_b.name}_bnfold", (b * params.scale.reshape(1, -1)).astype(dtype))
    node.replace_input_with(1, new_b)
    # The scaled product is a new tensor: a fresh name keeps it from being
    # compared against the original MatMul output.
    out.name = ctx.fresh(f"{out.name}_bnscaled")
    return _append_add(node, out, params.shift.astype(dtype), ctx)


def _append_add(after: ir.Node, value: ir.Value, addend: np.ndarray, ctx: _Context) -> ir.Value:
    """Inserts ``Add(value, addend)`` after ``after`` and returns its output."""
    add = ir.Node("", "Add", [value], outputs=[ir.Value(name=ctx.fresh(f"{value.name}_bnadd"))])
    graph = after.graph
    assert graph is not None
    graph.insert_after(after, add)
    add.resize_inputs(2)
    add.replace_input_with(1, ctx.constant(add, f"{value.name}_bnshift", addend))
    add.outputs[0].type = value.type
    add.outputs[0].shape = value.shape
    return add.outputs[0]


def _try_standalone(bn: ir.Node, params: _BnParams, ctx: _Context) -> bool:
    x, y = bn.inputs[0], bn.outputs[0]
    # Y has X's shape, so either one tells the rank.
    known = [v.shape for v in (x, y) if v is not None and v.shape is not None]
    if x is None or not known or known[0].rank() < 2:
        logger.debug("fold-batchnorm: %s has an input of unknown rank; left", bn.name)
        return False
    rank = known[0].rank()
    dtype = x.dtype if x.dtype is not None else y.dtype
    if dtype not in _FLOAT_TYPES:
        return False
    np_dtype = dtype.numpy()  # type: ignore[union-attr]
    shape = (params.scale.size,) + (1,) * (rank - 2)
    mul_type = ir.TensorType(dtype)  # type: ignore[arg-type]
    mul_out = ir.Value(name=ctx.fresh(f"{y.name}_bnmul"), type=mul_type, shape=y.shape)
    mul = ir.Node("", "Mul", [x], outputs=[mul_out])
    bn.graph.insert_before(bn, mul)  # type: ignore[union-attr]
    mul.resize_inputs(2)
    mul.replace_input_with(1, ctx.constant(mul, f"{y.name}_bnscale", params.scale.reshape(shape).astype(np_dtype)))
    result = _append_add(mul, mul_out, params.shift.reshape(shape).astype(np_dtype), ctx)
    _replace_bn(bn, result)
    _drop_unused(list(params.inputs))
    logger.debug("fold-batchnorm: rewrote %s as Mul + Add", bn.name)
    return True


def _replace_bn(bn: ir.Node, replacement: ir.Value) -> None:
    """Readers of the BN output read ``replacement``, which takes its name, type and shape."""
    y = bn.outputs[0]
    name = y.name
    y.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph = bn.graph
    assert graph is not None
    graph.remove(bn, safe=True)
    replacement.name = name
    if y.type is not None:
        replacement.type = y.type
    if y.shape is not None:
        replacement.shape = y.shape


def _drop_unused(values: list[ir.Value]) -> None:
    """Removes initializers and Constant nodes that the rewrite left without readers."""
    for value in dict.fromkeys(values):
        if value.uses() or value.is_graph_input() or value.is_graph_output():
            continue
        producer = value.producer()
        if value.is_initializer() and value.graph is not None and value.name in value.graph.initializers:
            del value.graph.initializers[value.name]
        elif producer is not None and producer.op_type == "Constant" and producer.graph is not None:
            producer.graph.remove(producer, safe=True)
