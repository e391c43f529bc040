"""Merge identical initializers and identical nodes.

**Initializers.** Two initializers of one graph with the same dtype, shape
and bytes hold the same tensor, so every use of the later one can read the
first and the later one is dropped; outputs are bit-identical. Each tensor is
hashed (BLAKE2b, 256-bit) at most once per run, and only when another
initializer of the graph has its dtype and shape; a digest match is taken as
equality without re-reading both tensors (a collision has probability about
2^-128). Graph inputs (the caller may override them) and graph outputs are
left alone, and each graph (main graph, every If/Loop/Scan body) is
deduplicated on its own: an initializer of a body never replaces one of the
enclosing graph. onnx_ir's ``DeduplicateHashedInitializersPass`` is not
wrapped: with onnx-ir 1.1 it hashes string tensors through numpy's object
buffer, that is by pointer, so equal strings rarely match; it re-reads both
tensors on every match; and it logs a WARNING for each initializer that is a
graph input, which is every initializer of an IR<4 model.

**Nodes.** Two deterministic nodes with the same op, attributes and input
values compute the same outputs, so the later node's outputs are replaced by
the earlier node's and the later node is removed. onnx_ir's
``CommonSubexpressionEliminationPass`` (onnx-ir 1.1) is not reused as is: it
only visits the main graph, merges custom-domain nodes (whose determinism is
unknown) and Bernoulli, equates 0.0 and -0.0 attributes, and, when the
removed node feeds a graph output, renames the kept value without recording
provenance. Nodes with TENSORS, SPARSE_TENSOR(S) or TYPE_PROTO(S) attributes
are not compared here. This pass follows its algorithm per graph
(main graph, bodies and functions) and fixes those points. Nodes with a body
(If/Loop/Scan) and Constant-like tensor attributes larger than
``size_limit`` elements are not compared.
"""

from __future__ import annotations

__all__ = ["DeduplicateInitializersPass", "EliminateCommonSubexpressionsPass"]

import functools
import hashlib
import logging
from collections.abc import Hashable

import onnx
import onnx_ir as ir

from graphopt import provenance
from graphopt.graphs import GraphLike, apply_to_graphs
from graphopt.stats import tensor_layout

logger = logging.getLogger(__name__)

_NON_DETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


class DeduplicateInitializersPass(ir.passes.InPlacePass):
    """Merge initializers of one graph that have equal dtype, shape and bytes."""

    visits_subgraphs = True

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Functions cannot hold initializers.
        return ir.passes.PassResult(model, apply_to_graphs(model, _dedup_graph, functions=False))


def _dedup_graph(graph: GraphLike) -> bool:
    if not isinstance(graph, ir.Graph):
        return False
    by_layout: dict[tuple[ir.DataType, tuple[int, ...]], list[ir.Value]] = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if value.is_graph_input() or value.is_graph_output() or tensor is None:
            continue
        by_layout.setdefault(tensor_layout(tensor), []).append(value)
    modified = False
    for values in by_layout.values():
        if len(values) < 2:
            continue
        kept: dict[bytes, ir.Value] = {}
        for value in values:
            digest = _digest(value.const_value)  # type: ignore[arg-type]
            if digest not in kept:
                kept[digest] = value
                continue
            modified = _try_merge(graph, value, kept[digest]) or modified
    return modified


def _try_merge(graph: ir.Graph, duplicate: ir.Value, keep: ir.Value) -> bool:
    # Uses from nested bodies are rewired too: onnx_ir tracks outer-scope uses.
    duplicate.replace_all_uses_with(keep)
    assert duplicate.name is not None
    graph.initializers.pop(duplicate.name)
    logger.debug("dedup-initializers: %s merged into %s", duplicate.name, keep.name)
    return True


_DIGEST_KEY = "graphopt.content_digest"


def _digest(tensor: ir.TensorProtocol) -> bytes:
    """The tensor's content hash, computed once per tensor object.

    IR tensors are immutable (a rewrite installs a new tensor object), so the
    digest is cached in the tensor's own metadata: the fold group's later
    rounds reuse it instead of re-reading every weight each round.
    """
    cached = tensor.meta.get(_DIGEST_KEY)
    if cached is not None:
        return cached
    digest = _compute_digest(tensor)
    tensor.meta[_DIGEST_KEY] = digest
    return digest


def _compute_digest(tensor: ir.TensorProtocol) -> bytes:
    hasher = hashlib.blake2b(digest_size=32)
    if tensor.dtype == ir.DataType.STRING:
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] differ.
        for item in tensor.string_data():  # type: ignore[attr-defined]
            hasher.update(len(item).to_bytes(8, "little"))
            hasher.update(item)
    else:
        hasher.update(tensor.tobytes())
    return hasher.digest()


class EliminateCommonSubexpressionsPass(ir.passes.InPlacePass):
    """Replace a node by an earlier identical one (same op, attributes and inputs)."""

    visits_subgraphs = True

    def __init__(self, *, size_limit: int = 10) -> None:
        """Args:
        size_limit: Nodes with a tensor attribute of more elements than this
            (Constant weights) are not compared.
        """
        super().__init__()
        if isinstance(size_limit, bool) or not isinstance(size_limit, int) or size_limit < 0:
            raise ValueError(f"size_limit must be a non-negative int, got {size_limit!r}")
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def cse_graph(graph: GraphLike) -> bool:
            seen: dict[Hashable, ir.Node] = {}
            modified = False
            for node in list(graph):
                # A twin reads the very same values, so each input of a node
                # with a twin has two uses or more; most nodes fail this test
                # and skip building a key.
                if any(value is not None and len(value.uses()) < 2 for value in node.inputs):
                    continue
                key = _node_key(node, self.size_limit)
                if key is None:
                    continue
                if key in seen:
                    modified = _try_merge_node(model, graph, node, seen[key]) or modified
                else:
                    seen[key] = node
            return modified

        return ir.passes.PassResult(model, apply_to_graphs(model, cse_graph))


def _node_key(node: ir.Node, size_limit: int) -> Hashable | None:
    """What makes two nodes compute the same thing, or None when the node is not compared."""
    if node.domain != "" or node.op_type in _NON_DETERMINISTIC or not node.outputs or not _standard_op(node.op_type):
        return None
    attributes = []
    for name, attr in node.attributes.items():
        key = _attribute_key(attr, size_limit)
        if key is None:
            logger.debug("cse: %s has attribute %s of type %s; not compared", node.op_type, name, attr.type)
            return None
        attributes.append((name, key))
    inputs = tuple(id(value) if value is not None else None for value in node.inputs)
    return (node.op_type, node.overload, node.version, len(node.outputs), inputs, tuple(sorted(attributes)))


@functools.cache
def _standard_op(op_type: str) -> bool:
    # An op onnx does not define may be a custom kernel with side effects or
    # randomness; two of them are never assumed to compute the same thing.
    return onnx.defs.has(op_type)


def _attribute_key(attr: ir.Attr | ir.RefAttr, size_limit: int) -> Hashable | None:
    if attr.is_ref():
        return ("ref", attr.ref_attr_name, attr.type)
    value = attr.value
    if attr.type == ir.AttributeType.FLOAT:
        # float.hex tells 0.0 from -0.0 and makes equal NaNs compare equal.
        return float(value).hex()
    if attr.type == ir.AttributeType.FLOATS:
        return tuple(float(v).hex() for v in value)
    if attr.type in (ir.AttributeType.INT, ir.AttributeType.STRING):
        return value
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return tuple(value)
    if attr.type == ir.AttributeType.TENSOR and value.size <= size_limit:
        array = value.numpy()
        return (value.dtype, array.shape, array.tobytes() if array.dtype != object else tuple(array.reshape(-1)))
    return None


def _try_merge_node(model: ir.Model, graph: GraphLike, node: ir.Node, keep: ir.Node) -> bool:
    for old, new in zip(node.outputs, keep.outputs):
        if old.is_graph_output():
            _hand_over_output_name(model, graph, node, old, new)
    ir.convenience.replace_all_uses_with(list(node.outputs), list(keep.outputs))
    graph.remove(node, safe=True)
    logger.debug("cse: %s merged into %s", node.name or node.op_type, keep.name or keep.op_type)
    return True


def _hand_over_output_name(model: ir.Model, graph: GraphLike, node: ir.Node, old: ir.Value, new: ir.Value) -> None:
    """Makes the graph output ``old`` read ``new`` under the name ``old`` had."""
    output_name = old.name
    if new.is_graph_output() or new.is_graph_input():
        # ``new`` already carries a boundary name: keep both through an Identity.
        identity = ir.node("Identity", inputs=[new], num_outputs=1)
        graph.insert_before(node, identity)
        replacement = identity.outputs[0]
    else:
        replacement = new
        if new.name and output_name:
            provenance.record(model, output_name, new.name)
    # The graph output's declared type and shape are the user's interface: they win
    # over what the kept value carries (possibly nothing, or a less precise shape).
    if old.type is not None:
        replacement.type = old.type
    if old.shape is not None:
        replacement.shape = old.shape
    for index, value in enumerate(graph.outputs):
        if value is old:
            graph.outputs[index] = replacement
    old.name = None  # ``old`` goes with its node; its name moves to the replacement.
    replacement.name = output_name
