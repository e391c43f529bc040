"""Hypothesis strategies: random valid float32 ONNX models with static shapes.

``models()`` grows a DAG from one input ``x``, one step at a time. Each step
takes an earlier value (most often the newest, so patterns chain) and adds:

- ``unary``: Relu, Sigmoid, Neg, Tanh, Abs;
- ``binary``: Add/Mul/Sub/Div with a constant (scalar, per-axis or full
  shape, on either side; divisors stay away from 0), or Add/Sub/Mul of two
  values of one shape;
- ``noop``: Identity, Dropout, same-type Cast, zero Pad, full Slice, flat
  Expand, single-input Concat, single-output Split, and near misses that are
  not no-ops (partial Slice, real Pad, Cast round trip, growing Expand);
- ``matmul`` / ``gemm`` (transA/transB, alpha, beta, every bias shape) /
  ``conv`` (groups including depthwise, strides, pads), each optionally
  followed by BatchNormalization or a per-channel Add/Mul/Sub/Div;
- ``batchnorm`` alone, with well-conditioned statistics;
- ``transpose`` (then its inverse, another one, or nothing), ``reshape``
  (then back, with -1 or 0 entries), ``flatten`` (Flatten, or
  Unsqueeze then Squeeze);
- ``reduce`` (ReduceMean, down to 0-d values), ``concat`` and ``split``;
- ``constant_expression``: ``x op f(constants)`` with f arithmetic on
  constants, a Transpose of a constant, ConstantOfShape, Expand or Tile;
- ``shape_reshape``: Reshape to a shape computed by Shape/Size/Slice/Concat;
- ``if``: an If on the bool input ``c`` whose bodies read an outer value and
  outer constants through shape-keeping steps;
- ``duplicate``: a copy of an earlier node (what ``cse`` merges).

Weights are new, shared with an earlier node, byte-identical copies (what
``dedup-initializers`` merges) or stored transposed behind a Transpose.
Constants are initializers (of the graph or, in bodies, of the enclosing
one) or Constant nodes, and now and then initializers that are also graph
inputs, which no pass may treat as constants. Graph outputs are the newest
value and up to two earlier ones (still read by later nodes); unused values
are dead code for ``dce``. Half the models carry value_info from onnx shape
inference. Structure comes from hypothesis draws, so failures shrink to
short graphs; numbers come from a drawn numpy seed, scaled so that values
stay near 1.
"""

from __future__ import annotations

__all__ = ["ALL_KINDS", "BODY_KINDS", "LAYER_KINDS", "Drawn", "models"]

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper
from properties.builder import GraphBuilder, Shape
from properties.steps import ALL_KINDS, BODY_KINDS, LAYER_KINDS, grow

_FLOAT = onnx.TensorProto.FLOAT
IR_VERSIONS = {13: 7, 17: 8}


class Drawn:
    """A drawn model and feeds for it; shown as ONNX text when hypothesis reports a failure."""

    def __init__(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        self.proto, self.feeds = proto, feeds

    def __repr__(self) -> str:
        feeds = ", ".join(f"{name}: {array.dtype}{list(array.shape)}" for name, array in self.feeds.items())
        return f"Drawn(feeds={{{feeds}}}, ir_version={self.proto.ir_version}):\n{onnx.printer.to_text(self.proto)}"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis prints failing examples with this
        printer.text(repr(self))


def _input_shape(draw, widths: Sequence[int], ranks: Sequence[int]) -> Shape:
    rank = draw(st.sampled_from(ranks))
    if rank == 4:
        return (draw(st.sampled_from((1, 2))), draw(st.sampled_from((1, 2, 3, *widths))), *draw(st.tuples(st.integers(3, 6), st.integers(3, 6))))
    if rank == 2:
        return (draw(st.sampled_from((1, 2, 3, 5))), draw(st.sampled_from((2, 3, *widths))))
    return (draw(st.sampled_from((1, 2))), draw(st.sampled_from((2, 3))), draw(st.sampled_from(widths)))


@st.composite
def models(
    draw,
    kinds: Sequence[str] = ALL_KINDS,
    *,
    min_steps: int = 1,
    max_steps: int = 10,
    widths: Sequence[int] = (4, 8),
    ranks: Sequence[int] = (4, 2, 3),
    opsets: Sequence[int] = (13, 17),
) -> Drawn:
    """A random valid model (float32 input ``x``, bool input ``c`` when an If uses it) and feeds for it.

    Args:
        kinds: Step kinds to draw from (repeat one to draw it more often).
        min_steps: Fewest steps in the main graph.
        max_steps: Most steps in the main graph.
        widths: Channel and feature sizes layers may take.
        ranks: Ranks the input ``x`` may have.
        opsets: Default-domain opsets to draw from.
    """
    opset = draw(st.sampled_from(opsets))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = GraphBuilder(draw, rng, itertools.count(), widths, opset)
    shape = _input_shape(draw, widths, ranks)
    g.values["x"] = shape
    newest = grow(g, "x", draw(st.integers(min_steps, max_steps)), kinds)
    built = [name for name in g.values if name != "x"]
    extra = draw(st.lists(st.sampled_from(built), max_size=2, unique=True)) if built else []
    outputs = list(dict.fromkeys([newest, *extra]))
    inputs = [helper.make_tensor_value_info("x", _FLOAT, shape), *g.overridable]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if g.uses_condition:
        inputs.append(helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []))
        feeds["c"] = np.array(draw(st.booleans()))
    graph = helper.make_graph(
        g.nodes, "random", inputs, [helper.make_tensor_value_info(name, _FLOAT, g.values[name]) for name in outputs], g.initializers
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSIONS[opset])
    if draw(st.booleans()):
        # With value_info, passes that need shapes (collapse-reshapes, fuse-matmul-add, ...) can fire.
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return Drawn(proto, feeds)
