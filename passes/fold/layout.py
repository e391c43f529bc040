"""Fold layout-only ops: Transpose chains, constant Transposes, reshape chains.

``FoldTransposesPass``
    ``Transpose(Transpose(x, p1), p2) = Transpose(x, p)`` with
    ``p[i] = p1[p2[i]]`` (output axis ``i`` reads axis ``p2[i]`` of the middle
    tensor, which reads axis ``p1[p2[i]]`` of ``x``). When ``p`` is the identity
    both nodes go and consumers read ``x``. Legal when the middle value has the
    second Transpose as its only consumer and is not a graph output; when the
    identity case would remove a graph output, the site is skipped.
    ``Transpose(c)`` of a constant ``c`` (initializer that is not a graph input,
    or Constant node) becomes a new initializer ``c_transposed`` holding
    ``np.transpose(c, perm)``, registered in the Transpose's graph. The old
    constant is dropped only when nothing else reads it, so a shared weight
    never changes under another user. Skipped when the Transpose's output is a
    graph output, and in functions (they cannot hold initializers). An absent
    ``perm`` means "reverse the axes" and needs the input's rank.

``CollapseReshapesPass``
    Reshape, Flatten, Squeeze and Unsqueeze only re-index the same row-major
    buffer, so a chain of them (each intermediate read only by the next link and
    not a graph output) equals one ``Reshape(x, s)`` to the chain's final shape:

    - if the last link is ``Reshape(., s2)`` with constant ``s2`` that has no 0
      (copy-a-dim) entries, ``s2`` depends on nothing but the element count, so
      ``Reshape(x, s2)`` is exact even with dynamic (batch) dims;
    - else if the final output's shape is fully static (from ``value.shape``)
      with no zero dims, the chain becomes ``Reshape(x, s)`` with ``s`` a new
      int64 initializer;
    - if ``x`` already has that static shape, the chain is removed entirely
      (skipped when its output is a graph output).

    The final output keeps its name, so no provenance is recorded.

Both passes leave custom domains alone and leave constants they no longer read
to ``dce``, except the Transposed initializer noted above.
"""

from __future__ import annotations

__all__ = ["FoldTransposesPass", "CollapseReshapesPass"]

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.graphs import GraphLike, apply_to_graphs
from graphopt.naming import NameAllocator
from passes.fold.noops import constant_array

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")
_IR_VERSION_SEPARATE_INITIALIZERS = 4
_RESHAPE_LIKE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})

NameMaker = Callable[[str], str]


class FoldTransposesPass(ir.passes.InPlacePass):
    """Merge consecutive Transposes and fold Transposes of constants."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset({"Transpose"})

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        make_name = NameAllocator(model).fresh

        def rewrite(graph: GraphLike) -> bool:
            can_fold = _can_add_initializers(model, graph)
            changed = False
            for node in list(graph):
                if node.graph is None or node.op_type != "Transpose" or node.domain not in _ONNX_DOMAINS:
                    continue
                if _try_merge_transposes(node):
                    changed = True
                if node.graph is not None and can_fold and _try_fold_constant(node, make_name):
                    changed = True
            return changed

        return ir.passes.PassResult(model, apply_to_graphs(model, rewrite))


class CollapseReshapesPass(ir.passes.InPlacePass):
    """Collapse chains of Reshape/Flatten/Squeeze/Unsqueeze into one Reshape."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset(_RESHAPE_LIKE)

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        make_name = NameAllocator(model).fresh

        def rewrite(graph: GraphLike) -> bool:
            can_add = _can_add_initializers(model, graph)
            changed = False
            for node in list(graph):
                if node.graph is not None and _try_collapse_chain(node, can_add, make_name):
                    changed = True
            return changed

        return ir.passes.PassResult(model, apply_to_graphs(model, rewrite))


def _can_add_initializers(model: ir.Model, graph: GraphLike) -> bool:
    """Functions hold no initializers; below IR 4 every initializer must also be an input."""
    return isinstance(graph, ir.Graph) and model.ir_version >= _IR_VERSION_SEPARATE_INITIALIZERS


def _perm(node: ir.Node, rank: int | None = None) -> list[int] | None:
    """The node's permutation, else the reversal of ``rank`` (or the input's rank) axes, else None."""
    perm = node.attributes.get_ints("perm")
    if perm is not None:
        return list(perm)
    source = node.inputs[0] if node.inputs else None
    if rank is None and source is not None and source.shape is not None:
        rank = len(source.shape)
    return None if rank is None else list(range(rank))[::-1]


def _try_merge_transposes(node: ir.Node) -> bool:
    middle = node.inputs[0] if node.inputs else None
    first = middle.producer() if middle is not None else None
    if first is None or first.op_type != "Transpose" or first.domain not in _ONNX_DOMAINS:
        return False
    if first.graph is not node.graph:
        return False
    assert middle is not None
    if len(middle.uses()) != 1 or middle.is_graph_output():
        logger.debug("fold-transposes: %s has other readers; left", middle.name)
        return False
    p1, source = _perm(first), first.inputs[0]
    p2 = _perm(node, len(p1) if p1 is not None else None)
    if p1 is None or p2 is None or source is None or len(p1) != len(p2):
        return False
    composed = [p1[axis] for axis in p2]
    graph = node.graph
    assert graph is not None
    output = node.outputs[0]
    if composed == list(range(len(composed))):
        if output.is_graph_output():
            logger.debug("fold-transposes: identity pair ends in graph output %s; left", output.name)
            return False
        output.replace_all_uses_with(source)
        graph.remove([node, first], safe=True)
    else:
        node.replace_input_with(0, source)
        node.attributes["perm"] = ir.AttrInt64s("perm", composed)
        graph.remove(first, safe=True)
    logger.debug("fold-transposes: merged Transposes into %s", output.name)
    return True


def _try_fold_constant(node: ir.Node, make_name: NameMaker) -> bool:
    source, output = node.inputs[0], node.outputs[0]
    if source is None or output.is_graph_output():
        return False
    array = constant_array(source)
    if array is None or array.dtype == object:
        return False
    perm = _perm(node, array.ndim)
    if perm is None or len(perm) != array.ndim:
        return False
    # np.asarray(order="C"), not np.ascontiguousarray: the latter makes a 0-d constant 1-D.
    folded = np.asarray(np.transpose(array, perm), order="C")
    name = make_name(f"{source.name or 'const'}_transposed")
    value = ir.Value(
        name=name,
        shape=ir.Shape(folded.shape),
        type=ir.TensorType(ir.DataType.from_numpy(folded.dtype)),
        # ir.Tensor, not ir.tensor: the latter's Protocol checks cost ~60 us per call.
        const_value=ir.Tensor(folded, name=name),
    )
    graph = node.graph
    assert graph is not None
    graph.register_initializer(value)
    output.replace_all_uses_with(value)
    graph.remove(node, safe=True)
    _drop_if_unused(source)
    logger.debug("fold-transposes: folded Transpose of %s into %s", source.name, name)
    return True


def _drop_if_unused(value: ir.Value) -> None:
    """Removes an initializer or Constant node nothing reads any more."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    owner = value.graph
    if value.is_initializer() and owner is not None and value.name in owner.initializers:
        del owner.initializers[value.name]
    elif (producer := value.producer()) is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


def _is_reshape_like(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in _RESHAPE_LIKE and node.domain in _ONNX_DOMAINS and bool(node.inputs)


def _chain_ending_at(node: ir.Node) -> list[ir.Node]:
    """The reshape-like nodes feeding ``node`` one into the next, ``node`` last; [] if ``node`` is not a chain end."""
    if not _is_reshape_like(node):
        return []
    output = node.outputs[0]
    if not output.is_graph_output() and len(output.uses()) == 1:
        (use,) = output.uses()
        if _is_reshape_like(use.node) and use.idx == 0 and use.node.graph is node.graph:
            return []  # a later node ends this chain
    chain = [node]
    while True:
        link = chain[0].inputs[0]
        producer = link.producer() if link is not None else None
        if (
            link is None
            or not _is_reshape_like(producer)
            or producer is None
            or producer.graph is not node.graph
            or len(link.uses()) != 1
            or link.is_graph_output()
        ):
            return chain
        chain.insert(0, producer)


def _try_collapse_chain(node: ir.Node, can_add_initializers: bool, make_name: NameMaker) -> bool:
    chain = _chain_ending_at(node)
    source = chain[0].inputs[0] if chain else None
    if source is None:
        return False
    output = node.outputs[0]
    final = _static(output.shape)
    if final is not None and _static(source.shape) == final:
        if output.is_graph_output():
            logger.debug("collapse-reshapes: no-op chain ends in graph output %s; left", output.name)
            return False
        output.replace_all_uses_with(source)
        node.graph.remove(chain, safe=True)  # type: ignore[union-attr]
        logger.debug("collapse-reshapes: removed %d no-op reshapes before %s", len(chain), output.name)
        return True
    if len(chain) < 2:
        return False
    target = _reusable_shape(node)
    if target is None:
        graph = node.graph
        if final is None or 0 in final or not can_add_initializers or graph is None:
            return False
        target = _shape_initializer(graph, final, make_name(f"{output.name}_shape"))
    _replace_chain(chain, source, target)
    return True


def _reusable_shape(node: ir.Node) -> ir.Value | None:
    """The last link's shape input when it is a constant without copy-dim zeros."""
    if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    shape = constant_array(node.inputs[1])
    if shape is None or shape.ndim != 1 or np.any(shape == 0):
        return None
    return node.inputs[1]


def _shape_initializer(graph: ir.Graph, dims: tuple[int, ...], name: str) -> ir.Value:
    array = np.asarray(dims, dtype=np.int64)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.INT64),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _replace_chain(chain: list[ir.Node], source: ir.Value, target: ir.Value) -> None:
    """Replaces ``chain`` by ``Reshape(source, target)`` whose output keeps the chain output's name."""
    last = chain[-1]
    graph = last.graph
    assert graph is not None
    old = last.outputs[0]
    reshape = ir.Node("", "Reshape", [source, target], num_outputs=1)
    new = reshape.outputs[0]
    new.shape, new.type = old.shape, old.type
    graph.insert_before(last, reshape)
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(chain, safe=True)
    new.name = name
    logger.debug("collapse-reshapes: %d reshapes into one for %s", len(chain), name)


def _static(shape: ir.Shape | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)
