"""GraphBuilder: one ONNX graph under construction for the strategies, and its constants.

Kept apart from the steps (steps.py, layers.py) so that every step shares
one way of making constants: initializers, Constant nodes, outer-scope
initializers, copies of earlier bytes, and initializers that are also graph
inputs.
"""

from __future__ import annotations

__all__ = ["GraphBuilder", "Shape", "broadcast_shape", "constant_operand", "elementwise_constant"]

import math
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

Shape = tuple[int, ...]
# Constant roles whose copies compute the same thing (an Add operand stays an Add operand).
_COPYABLE = frozenset({"add", "sub", "mul", "div", "bias", "bnscale", "bnbias", "bnmean", "bnvar"})


class GraphBuilder:
    """One graph under construction: nodes, initializers, and its float values with their static shapes."""

    def __init__(self, draw, rng: np.random.Generator, names: Iterator[int], widths: Sequence[int], opset: int, outer: GraphBuilder | None = None):
        self.draw, self.rng, self.names, self.widths, self.opset, self.outer = draw, rng, names, widths, opset, outer
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.values: dict[str, Shape] = {}
        # Constants visible here, by shape: candidates for sharing and copying.
        self.weights: dict[Shape, list[tuple[str, np.ndarray]]] = {k: list(v) for k, v in outer.weights.items()} if outer else {}
        # Constant arrays made so far, by (role, dtype, shape): candidates for byte-identical copies.
        self.arrays: dict[tuple, list[np.ndarray]] = {k: list(v) for k, v in outer.arrays.items()} if outer else {}
        # Bodies keep their input's shape (both branches must agree): steps keep it, and
        # start only from values that have it.
        self.preserve = outer is not None
        self.body_shape: Shape | None = None
        self.uses_condition = False
        self.overridable: list[onnx.ValueInfoProto] = []  # initializers that are graph inputs too

    def fresh(self, base: str) -> str:
        return f"{base}{next(self.names)}"

    def node_name(self) -> str | None:
        """A unique node name, or none at all for one node in four (ONNX does not require names)."""
        name = self.fresh("n")
        return None if self.rng.random() < 0.25 else name

    def choice(self, options: Sequence):
        return self.draw(st.sampled_from(options))

    def node(self, op: str, inputs: list[str], shapes: Sequence[Shape], *, data: bool = True, **attrs) -> list[str]:
        """Adds a node; its outputs join the float values later steps read unless ``data`` is False."""
        outputs = [self.fresh(op.lower()) for _ in shapes]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.node_name(), **attrs))
        if data:
            self.values.update(zip(outputs, shapes))
        return outputs

    def constant(self, array: np.ndarray, base: str = "c") -> str:
        """A constant: an initializer here or in the enclosing graph, a Constant node, or now and then an
        initializer that is also a graph input (a default the caller may override: not a constant to fold)."""
        key = (base, array.dtype.str, array.shape)
        earlier = self.arrays.setdefault(key, [])
        if base in _COPYABLE and earlier and self.draw(st.booleans()):
            array = earlier[self.choice(range(len(earlier)))]  # the same bytes again: dedup-initializers merges them
        earlier.append(array)
        name = self.fresh(base)
        rare = "outer" if self.outer else "input"
        where = self.choice(("initializer", "node", "initializer", "node", "initializer", "node", rare))
        if where == "node":
            self.nodes.append(_constant_node(name, array, self.draw(st.booleans()), self.node_name()))
        elif where == "outer":
            self.outer.initializers.append(numpy_helper.from_array(array, name))  # type: ignore[union-attr]
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
            if where == "input":
                self.overridable.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.constant(np.asarray(values, np.int64), "s")

    def weight(self, shape: Shape, scale: float) -> str:
        """A float weight: new, shared with an earlier node, or a byte-identical copy of one;
        sometimes stored transposed behind a Transpose node, as some exporters do."""
        earlier = self.weights.get(shape, [])
        how = self.choice(("new", "shared", "copy")) if earlier else "new"
        if how == "shared":
            return earlier[self.choice(range(len(earlier)))][0]
        if how == "copy":
            array = earlier[self.choice(range(len(earlier)))][1]
        else:
            array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 2 and self.draw(st.booleans()):
            stored = self.constant(np.ascontiguousarray(array.T), "wt")
            name = self.fresh("w")
            self.nodes.append(helper.make_node("Transpose", [stored], [name], name=self.node_name(), perm=[1, 0]))
        else:
            name = self.constant(array, "w")
        self.weights.setdefault(shape, []).append((name, array))
        return name

    def vector(self, size: int, low: float, high: float, signed: bool = False) -> np.ndarray:
        values = self.rng.uniform(low, high, size)
        if signed:
            values *= self.rng.choice([-1.0, 1.0], size)
        return values.astype(np.float32)


def _constant_node(name: str, array: np.ndarray, compact: bool, node_name: str | None) -> onnx.NodeProto:
    """A Constant node; ``compact`` uses value_float/value_int/value_ints where the array allows."""
    if compact and array.dtype == np.float32 and array.ndim == 0:
        return helper.make_node("Constant", [], [name], name=node_name, value_float=float(array))
    if compact and array.dtype == np.int64 and array.ndim <= 1:
        key = "value_int" if array.ndim == 0 else "value_ints"
        return helper.make_node("Constant", [], [name], name=node_name, **{key: array.tolist()})
    return helper.make_node("Constant", [], [name], name=node_name, value=numpy_helper.from_array(array))


def broadcast_shape(g: GraphBuilder, shape: Shape) -> Shape:
    """A constant shape that broadcasts against ``shape`` without growing it."""
    rank = len(shape)
    form = g.choice(("scalar", "one", "axis", "full") if rank else ("scalar",))  # [1] would grow a 0-d value
    if form == "scalar":
        return ()
    if form == "one":
        return (1,)
    if form == "full":
        return shape
    axis = g.choice(range(rank))
    tail = (shape[axis],) + (1,) * (rank - 1 - axis)
    return (1,) * g.choice(range(axis + 1)) + tail


def constant_operand(g: GraphBuilder, op: str, shape: Shape) -> np.ndarray:
    if op in ("Add", "Sub"):
        return (g.rng.standard_normal(shape) * 0.5).astype(np.float32)
    low, high = (0.5, 1.5) if op == "Mul" else (0.5, 2.0)
    return g.vector(math.prod(shape), low, high, signed=True).reshape(shape)


def elementwise_constant(g: GraphBuilder, x: str, op: str, shape: Shape) -> str:
    """``x op c`` or ``c op x`` (never ``c / x``); returns the output."""
    c = g.constant(constant_operand(g, op, shape), op.lower())
    inputs = [c, x] if op != "Div" and g.draw(st.booleans()) else [x, c]
    return g.node(op, inputs, [g.values[x]])[0]
