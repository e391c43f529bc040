"""The steps the strategies grow graphs with, the table of step kinds, and the growing loop.

See strategies.py for what each kind adds. A step takes the builder and a
source value (a float value of the graph with a static shape) and adds
nodes; every value it adds to ``GraphBuilder.values`` may be read by later
steps.
"""

from __future__ import annotations

__all__ = ["ALL_KINDS", "BODY_KINDS", "LAYER_KINDS", "grow"]

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from properties.builder import GraphBuilder, Shape, broadcast_shape, constant_operand, elementwise_constant
from properties.layers import batchnorm, conv, gemm, matmul

_FLOAT = onnx.TensorProto.FLOAT
_INT64_MAX = int(np.iinfo(np.int64).max)


def _unary(g: GraphBuilder, x: str) -> None:
    g.node(g.choice(("Relu", "Sigmoid", "Neg", "Tanh", "Abs")), [x], [g.values[x]])


def _binary(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    same = [name for name, s in g.values.items() if s == shape]
    if g.draw(st.booleans()):
        elementwise_constant(g, x, g.choice(("Add", "Mul", "Sub", "Div")), broadcast_shape(g, shape))
    else:
        other = g.choice(same)
        g.node(g.choice(("Add", "Sub", "Mul")), [x, other], [shape])


def _noop(g: GraphBuilder, x: str) -> None:
    shape, rank = g.values[x], len(g.values[x])
    kinds = ["Identity", "Dropout", "Cast", "Pad", "Slice", "Expand", "Concat", "Split"]
    if not g.preserve:
        kinds += ["CastRoundTrip", "PartialSlice", "RealPad", "GrowingExpand"]
    kind = g.choice(kinds)
    if kind in ("Identity", "Concat"):
        g.node(kind, [x], [shape], **({"axis": 0} if kind == "Concat" else {}))
    elif kind == "Dropout":
        extra = g.choice(([], ["ratio"], ["ratio", "training"]))
        inputs = [x] + ([g.constant(np.array(0.5, np.float32))] if extra else []) + ([g.constant(np.array(False))] if len(extra) > 1 else [])
        g.node("Dropout", inputs, [shape])
    elif kind == "Cast":
        g.node("Cast", [x], [shape], to=_FLOAT)
    elif kind == "CastRoundTrip":
        # Neg in between: onnxruntime 1.32 drops a bare float->double->float Cast pair whose
        # result only If bodies read, and then fails with "Missing Input" (any optimization level).
        (wide,) = g.node("Cast", [x], [shape], data=False, to=onnx.TensorProto.DOUBLE)
        (negated,) = g.node("Neg", [wide], [shape], data=False)
        g.node("Cast", [negated], [shape], to=_FLOAT)
    elif kind in ("Pad", "RealPad"):
        pads = [0] * (2 * rank)
        if kind == "RealPad":
            pads[-1] = 1
        g.node("Pad", [x, g.ints(pads)], [shape[:-1] + (shape[-1] + pads[-1],)])
    elif kind in ("Slice", "PartialSlice"):
        axis = g.choice(range(rank))
        end = g.choice((_INT64_MAX, shape[axis], shape[axis] + 3))
        if kind == "PartialSlice" and shape[axis] > 1:
            end = shape[axis] - 1
        out = shape[:axis] + (min(end, shape[axis]),) + shape[axis + 1 :]
        g.node("Slice", [x, g.ints([0]), g.ints([end]), g.ints([axis]), g.ints([1])], [out])
    elif kind in ("Expand", "GrowingExpand"):
        target = g.choice(([1] * rank, list(shape)))
        if kind == "GrowingExpand":
            target = [2, *shape]
        g.node("Expand", [x, g.ints(target)], [np.broadcast_shapes(shape, tuple(target))])
    else:
        g.node("Split", [x], [shape], axis=0)


def _constant_expression(g: GraphBuilder, x: str) -> None:
    """``x op f(constants)``, where f folds to a constant: arithmetic on constants, a Transpose
    (of any rank, 0 included), or a broadcast (ConstantOfShape, Expand, Tile) to ``x``'s shape."""
    shape = g.values[x]
    op = g.choice(("Add", "Mul", "Sub"))
    form = g.choice(("arithmetic", "Transpose", "ConstantOfShape", "Expand", "Tile"))
    if form == "Transpose":
        const_shape = broadcast_shape(g, shape)
        stored = g.constant(constant_operand(g, op, const_shape[::-1]), op.lower())
        (operand,) = g.node("Transpose", [stored], [const_shape], data=False)  # no perm: reverse the axes
    elif form == "arithmetic":
        const_shape = broadcast_shape(g, shape)
        inner = g.choice(("Add", "Mul", "Sub"))
        a = g.constant(constant_operand(g, op, const_shape), op.lower())
        b = g.constant(constant_operand(g, "Mul" if op == "Mul" else "Add", const_shape), "mul" if op == "Mul" else "add")
        (operand,) = g.node(inner if op != "Mul" else "Mul", [a, b], [const_shape], data=False)
    elif form == "ConstantOfShape":
        fill = numpy_helper.from_array(np.asarray([g.rng.uniform(0.5, 1.5)], np.float32))
        (operand,) = g.node("ConstantOfShape", [g.ints(shape)], [shape], data=False, value=fill)
    elif form == "Expand":
        row = g.constant(constant_operand(g, op, (shape[-1],)), op.lower())
        (operand,) = g.node("Expand", [row, g.ints(shape)], [shape], data=False)
    else:
        row = g.constant(constant_operand(g, op, (1,) * (len(shape) - 1) + (shape[-1],)), op.lower())
        (operand,) = g.node("Tile", [row, g.ints([*shape[:-1], 1])], [shape], data=False)
    g.node(op, [x, operand], [shape])


def _shape_reshape(g: GraphBuilder, x: str) -> None:
    """Reshape to a shape computed from Shape/Size of ``x``, as exporters write flatten and view:
    fold-constants turns it into a constant since ``x``'s shape is static."""
    shape = g.values[x]
    form = g.choice(("same", "keep_first", "flat"))
    if form == "same":
        (target,) = g.node("Shape", [x], [(len(shape),)], data=False)
        out = shape
    elif form == "flat":
        (size,) = g.node("Size", [x], [()], data=False)
        (target,) = g.node("Unsqueeze", [size, g.ints([0])], [(1,)], data=False)
        out = (math.prod(shape),)
    else:
        if g.opset >= 15 and g.draw(st.booleans()):
            (first,) = g.node("Shape", [x], [(1,)], data=False, start=0, end=1)
        else:
            (full,) = g.node("Shape", [x], [(len(shape),)], data=False)
            (first,) = g.node("Slice", [full, g.ints([0]), g.ints([1])], [(1,)], data=False)
        (target,) = g.node("Concat", [first, g.ints([-1])], [(2,)], data=False, axis=0)
        out = (shape[0], math.prod(shape[1:]))
    g.node("Reshape", [x, target], [out])


def _transpose(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    rank = len(shape)
    perm = list(g.draw(st.permutations(range(rank))))
    if g.draw(st.booleans()):
        perm_attr: dict = {"perm": perm}
    else:
        perm, perm_attr = list(range(rank))[::-1], {}  # no perm: reverse the axes
    (y,) = g.node("Transpose", [x], [tuple(shape[p] for p in perm)], **perm_attr)
    then = "inverse" if g.preserve else g.choice(("inverse", "another", "none"))
    if then == "inverse":
        g.node("Transpose", [y], [shape], perm=np.argsort(perm).tolist())
    elif then == "another":
        second = list(g.draw(st.permutations(range(rank))))
        g.node("Transpose", [y], [tuple(g.values[y][p] for p in second)], perm=second)


def _factorization(g: GraphBuilder, size: int) -> Shape:
    """Random dims (1 to 4 of them) whose product is ``size``."""
    dims, rest = [], size
    for _ in range(g.choice((0, 1, 2, 3))):
        d = g.choice([d for d in range(1, rest + 1) if rest % d == 0])
        dims.append(d)
        rest //= d
    return (*dims, rest)


def _reshape(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    target = _factorization(g, math.prod(shape))
    spec = list(target)
    if g.draw(st.booleans()):
        spec[g.choice(range(len(spec)))] = -1
    (y,) = g.node("Reshape", [x, g.ints(spec)], [target])
    if g.preserve or g.draw(st.booleans()):
        back = list(shape)
        copies = [i for i in range(min(len(shape), len(target))) if shape[i] == target[i]]
        for i in copies:
            if g.draw(st.booleans()):
                back[i] = 0  # copy the dim of the intermediate
        if g.draw(st.booleans()):
            back[g.choice(range(len(back)))] = -1
        g.node("Reshape", [y, g.ints(back)], [shape])


def _flatten(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    if g.preserve or g.draw(st.booleans()):
        axis = g.choice(range(len(shape) + 1))
        (y,) = g.node("Unsqueeze", [x, g.ints([axis])], [shape[:axis] + (1,) + shape[axis:]])
        if g.preserve or g.draw(st.booleans()):
            g.node("Squeeze", [y, g.ints([axis])], [shape])
        return
    axis = g.choice(range(len(shape) + 1))
    g.node("Flatten", [x], [(math.prod(shape[:axis]), math.prod(shape[axis:]))], axis=axis)


def _reduce(g: GraphBuilder, x: str) -> None:
    """ReduceMean over some axes (all of them and keepdims=0 give a 0-d value)."""
    shape = g.values[x]
    axes = sorted(g.draw(st.sets(st.sampled_from(range(len(shape))), min_size=1)))
    keep = g.choice((0, 1))
    out = tuple(1 if i in axes else d for i, d in enumerate(shape)) if keep else tuple(d for i, d in enumerate(shape) if i not in axes)
    g.node("ReduceMean", [x], [out], axes=axes, keepdims=keep)


def _concat(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    axis = g.choice(range(len(shape)))
    others = [n for n, s in g.values.items() if len(s) == len(shape) and all(a == b or i == axis for i, (a, b) in enumerate(zip(s, shape)))]
    other = g.choice(others)
    out = list(shape)
    out[axis] += g.values[other][axis]
    g.node("Concat", [x, other], [tuple(out)], axis=axis - len(shape) if g.draw(st.booleans()) else axis)


def _split(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    axis = g.choice([i for i, d in enumerate(shape) if d >= 2])
    first = g.choice(range(1, shape[axis]))
    sizes = (first, shape[axis] - first)
    if shape[axis] % 2 == 0 and g.draw(st.booleans()):
        sizes, inputs = (shape[axis] // 2,) * 2, [x]  # equal parts: no split input
    else:
        inputs = [x, g.ints(sizes)]
    g.node("Split", inputs, [shape[:axis] + (s,) + shape[axis + 1 :] for s in sizes], axis=axis)


def _if(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    branches = {}
    for branch in ("then_branch", "else_branch"):
        body = GraphBuilder(g.draw, g.rng, g.names, g.widths, g.opset, outer=g)
        body.values[x] = body.body_shape = shape
        out = grow(body, x, g.draw(st.integers(1, 3)), BODY_KINDS)
        # One more unused node now and then: dead code inside a body.
        if g.draw(st.booleans()):
            _unary(body, x)
        g.uses_condition = g.uses_condition or body.uses_condition
        vi = [helper.make_tensor_value_info(out, _FLOAT, shape)]
        branches[branch] = helper.make_graph(body.nodes, g.fresh(branch), [], vi, body.initializers)
    g.uses_condition = True
    g.node("If", ["c"], [shape], **branches)


def _duplicate(g: GraphBuilder, x: str) -> None:
    """A copy of an earlier node with its own outputs: a common subexpression."""
    candidates = [n for n in g.nodes if n.op_type not in ("If", "Constant") and all(o in g.values for o in n.output)]
    original = g.choice(candidates)
    copy = onnx.NodeProto()
    copy.CopyFrom(original)
    copy.name = g.node_name() or ""
    del copy.output[:]
    for name in original.output:
        out = g.fresh("dup")
        copy.output.append(out)
        g.values[out] = g.values[name]
    g.nodes.append(copy)


Step = Callable[[GraphBuilder, str], object]
# Each step, and the source shapes it accepts.
_STEPS: dict[str, tuple[Step, Callable[[Shape], bool]]] = {
    "unary": (_unary, lambda s: True),
    "binary": (_binary, lambda s: True),
    "noop": (_noop, lambda s: len(s) >= 1),
    "matmul": (matmul, lambda s: len(s) >= 2),
    "gemm": (gemm, lambda s: len(s) == 2),
    "conv": (conv, lambda s: len(s) == 4),
    "batchnorm": (batchnorm, lambda s: 2 <= len(s) <= 4),
    "transpose": (_transpose, lambda s: len(s) >= 2),
    "reshape": (_reshape, lambda s: len(s) >= 1),
    "flatten": (_flatten, lambda s: 1 <= len(s) <= 4),
    "reduce": (_reduce, lambda s: len(s) >= 1),
    "concat": (_concat, lambda s: len(s) >= 1),
    "split": (_split, lambda s: any(d >= 2 for d in s)),
    "if": (_if, lambda s: True),
    "constant_expression": (_constant_expression, lambda s: len(s) >= 1),
    "shape_reshape": (_shape_reshape, lambda s: len(s) >= 1),
    "duplicate": (_duplicate, lambda s: True),
}
ALL_KINDS = tuple(_STEPS)
# Shape-keeping steps for If bodies (no nested If).
BODY_KINDS = ("unary", "binary", "noop", "matmul", "gemm", "conv", "batchnorm", "transpose", "reshape", "flatten")
# Weighted layers for the lossy passes, with the glue between them.
LAYER_KINDS = ("conv", "conv", "gemm", "matmul", "batchnorm", "unary", "binary", "reshape", "flatten", "concat", "if")


def _sources(g: GraphBuilder, kind: str) -> list[str]:
    """Values the step can start from, newest first (so that shrinking keeps chains and patterns stack)."""
    if kind == "duplicate" and not any(n.op_type not in ("If", "Constant") and all(o in g.values for o in n.output) for n in g.nodes):
        return []
    accepts = _STEPS[kind][1]
    return [
        name
        for name in reversed(list(g.values))
        if accepts(g.values[name]) and g.body_shape in (None, g.values[name])
    ]


def grow(g: GraphBuilder, start: str, steps: int, kinds: Sequence[str]) -> str:
    """Adds ``steps`` steps to ``g``; returns the newest value (made by a node of ``g``)."""
    newest = start
    for _ in range(steps):
        available = [kind for kind in kinds if _sources(g, kind)]
        if not available:
            break
        kind = g.choice(available)
        sources = _sources(g, kind)
        # Half the time the newest value: chains of layers, the patterns passes look for.
        source = sources[0] if g.draw(st.booleans()) else g.choice(sources)
        _STEPS[kind][0](g, source)
        newest = list(g.values)[-1]
    return newest
