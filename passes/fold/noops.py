"""Remove nodes that compute ``y = x``.

Each rewrite below is exact: the node's first output equals its data input
element for element, so consumers of ``y`` can read ``x`` instead.

- ``Identity(x)``.
- ``Dropout(x, ratio, training_mode)`` in inference: for opset >= 12 the
  ``training_mode`` input is absent or a constant ``False``; opsets 7-11 have no
  training mode in the graph; opset < 7 needs ``is_test=1``. The ``mask`` output
  must be unused (and not a graph output), since it would disappear.
- ``Cast(x, to=T)`` when ``x`` is already of element type ``T`` (dtype known).
- ``Pad(x, pads)`` in ``constant`` mode with constant, all-zero pads.
- ``Slice(x, starts, ends, axes, steps)`` (opset >= 10) taking the full range:
  constant starts all 0, steps all 1 (or absent) and every end either
  ``INT64_MAX`` or at least the static size of its axis.
- ``Expand(x, shape)`` that broadcasts nothing: ``shape`` is constant, no longer
  than ``rank(x)``, and each entry is 1 or equals the static dim of ``x`` it
  aligns with (so symbolic batch dims stay symbolic); or both ``x`` and ``y``
  carry the same fully static shape.
- ``Concat`` with a single input and ``Split`` with a single output.

Graph outputs keep their names: when ``y`` is a graph output, ``x`` is renamed
to ``y``'s name instead, which is only done when ``x`` is produced by a node of
the same graph and is not itself a graph input, graph output or initializer;
otherwise the site is skipped. No provenance entry is needed: the kept name
still holds the same tensor. Constant inputs left unused (pads, starts, ...)
are left to ``dce``. Nodes in custom domains are left alone.
"""

from __future__ import annotations

__all__ = ["EliminateNoOpsPass", "bypass_node", "constant_array"]

import logging

import numpy as np
import onnx_ir as ir

from graphopt.graphs import GraphLike, apply_to_graphs

logger = logging.getLogger(__name__)

INT64_MAX = int(np.iinfo(np.int64).max)
_ONNX_DOMAINS = ("", "ai.onnx")
# Opsets where Dropout gained the training_mode input, and lost is_test.
_DROPOUT_TRAINING_INPUT_OPSET = 12
_DROPOUT_NO_IS_TEST_OPSET = 7
# Slice moved starts/ends/axes/steps from attributes to inputs in opset 10.
_SLICE_INPUTS_OPSET = 10
# Pad moved pads from an attribute to an input in opset 11.
_PAD_INPUTS_OPSET = 11


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array a value is bound to, if it is a constant the user cannot override."""
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        logger.debug("noops: constant %s is malformed; left", value.name)
        return None
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def bypass_node(node: ir.Node, source: ir.Value) -> bool:
    """Makes consumers of ``node.outputs[0]`` read ``source`` and removes ``node``.

    Every other output of ``node`` must be unused. When the output is a graph
    output, ``source`` takes its name if it is a plain node output of the same
    graph; otherwise nothing changes and False is returned.
    """
    graph = node.graph
    output = node.outputs[0]
    if graph is None or any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return False
    if output.is_graph_output():
        producer = source.producer()
        if (
            producer is None
            or producer.graph is not graph
            or source.is_graph_input()
            or source.is_graph_output()
            or source.is_initializer()
        ):
            logger.debug("noops: %s is a graph output and %s cannot take its name; left", output.name, source.name)
            return False
        name = output.name
        # The value now is the graph output: its declared type and shape are the user's
        # interface and win over what is known of ``source`` (often a less precise
        # inferred shape, such as [unk, unk] for a declared [1, 9]).
        if output.type is not None:
            source.type = output.type
        if output.shape is not None:
            source.shape = output.shape
        output.replace_all_uses_with(source, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        source.name = name
        return True
    output.replace_all_uses_with(source)
    graph.remove(node, safe=True)
    return True


class EliminateNoOpsPass(ir.passes.InPlacePass):
    """Remove Identity, inference Dropout, same-type Cast, zero Pad, full Slice,
    non-broadcasting Expand, single-input Concat and single-output Split."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset({"Identity", "Dropout", "Cast", "Pad", "Slice", "Expand", "Concat", "Split"})

    def __init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_opset = _default_opset(model.opset_imports)

        def rewrite(graph: GraphLike) -> bool:
            opset = _default_opset(graph.opset_imports) if isinstance(graph, ir.Function) else model_opset
            changed = False
            for node in list(graph):
                if node.graph is not None and _try_eliminate(node, opset):
                    changed = True
            return changed

        modified = apply_to_graphs(model, rewrite)
        return ir.passes.PassResult(model, modified)


def _default_opset(imports: dict[str, int]) -> int:
    return imports.get("", imports.get("ai.onnx", 1))


def _try_eliminate(node: ir.Node, opset: int) -> bool:
    if node.domain not in _ONNX_DOMAINS or not node.inputs or not node.outputs:
        return False
    check = _CHECKS.get(node.op_type)
    if check is None:
        return False
    source = node.inputs[0]
    if source is None or not check(node, opset):
        return False
    if not bypass_node(node, source):
        return False
    logger.debug("noops: removed %s %s", node.op_type, node.name)
    return True


def _is_identity(node: ir.Node, opset: int) -> bool:
    return len(node.inputs) == 1


def _is_inference_dropout(node: ir.Node, opset: int) -> bool:
    if opset >= _DROPOUT_TRAINING_INPUT_OPSET:
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:
            flag = constant_array(training)
            if flag is None or flag.size != 1 or bool(flag.reshape(-1)[0]):
                logger.debug("noops: Dropout %s may train; left", node.name)
                return False
        return True
    if opset >= _DROPOUT_NO_IS_TEST_OPSET:
        return True
    return node.attributes.get_int("is_test", 0) == 1


def _is_same_type_cast(node: ir.Node, opset: int) -> bool:
    source = node.inputs[0]
    assert source is not None
    to = node.attributes.get_int("to")
    return source.dtype is not None and to is not None and int(source.dtype) == to


def _is_zero_pad(node: ir.Node, opset: int) -> bool:
    if node.attributes.get_string("mode", "constant") != "constant":
        return False
    if opset >= _PAD_INPUTS_OPSET:
        pads = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    else:
        ints = node.attributes.get_ints("pads")
        pads = None if ints is None else np.asarray(ints)
    return pads is not None and not np.any(pads)


def _is_full_slice(node: ir.Node, opset: int) -> bool:
    if opset < _SLICE_INPUTS_OPSET or len(node.inputs) < 3:
        return False
    starts, ends = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or np.any(starts != 0):
        return False
    if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
        return False
    if len(node.inputs) > 4 and node.inputs[4] is not None and (steps is None or np.any(steps != 1)):
        return False
    if np.all(ends >= INT64_MAX):
        return True
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None:
        return False
    rank = len(shape)
    axis_list = range(len(ends)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
    for axis, end in zip(axis_list, ends):
        if end >= INT64_MAX:
            continue
        if not 0 <= axis < rank or not isinstance(shape[axis], int) or end < shape[axis]:
            return False
    return True


def _is_trivial_expand(node: ir.Node, opset: int) -> bool:
    source, output = node.inputs[0], node.outputs[0]
    assert source is not None
    target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is not None and target.ndim == 1 and source.shape is not None and target.size <= len(source.shape):
        aligned = list(source.shape)[len(source.shape) - target.size :]
        # Broadcasting to 1 keeps any dim, symbolic ones included.
        pairs = zip(target.tolist(), aligned)
        return all(want == 1 or (isinstance(have, int) and want == have) for want, have in pairs)
    return _static(source.shape) is not None and _static(source.shape) == _static(output.shape)


def _is_single_input_concat(node: ir.Node, opset: int) -> bool:
    return len(node.inputs) == 1


def _is_single_output_split(node: ir.Node, opset: int) -> bool:
    return len(node.outputs) == 1


def _static(shape: ir.Shape | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)


_CHECKS = {
    "Identity": _is_identity,
    "Dropout": _is_inference_dropout,
    "Cast": _is_same_type_cast,
    "Pad": _is_zero_pad,
    "Slice": _is_full_slice,
    "Expand": _is_trivial_expand,
    "Concat": _is_single_input_concat,
    "Split": _is_single_output_split,
}
