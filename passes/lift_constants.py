"""Lift Constant nodes to initializers, so later passes see them as weights.

Paddle (and some TensorFlow) exports keep every weight in a ``Constant`` node.
Each such node becomes an initializer of the same name in the graph that held
it (main graph or If/Loop/Scan body), holding the same tensor, so the rewrite
is exact. Left alone, each logged at DEBUG:

- a Constant whose output is a graph output (an initializer cannot be one
  without also becoming an input in older IR versions);
- ``sparse_value`` Constants (initializers here are dense);
- Constants with fewer than ``min_elements`` elements;
- Constants inside subgraphs when the model's IR version is below 4, where
  every initializer must also be listed as a graph input and bodies of If
  nodes cannot take inputs. In the main graph of such models the lifted
  initializer is also appended to the graph inputs, as IR 3 requires.

Functions are not visited: ONNX functions cannot hold initializers.
"""

from __future__ import annotations

__all__ = ["LiftConstantsPass"]

import logging

import numpy as np
import onnx_ir as ir

from graphopt.graphs import iter_nodes

logger = logging.getLogger(__name__)

# The element type ONNX gives each list/scalar form of Constant.
_NUMERIC_ATTRIBUTE_DTYPES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}
# IR versions below this one require each initializer to be a graph input.
_IR_VERSION_SEPARATE_INITIALIZERS = 4


class LiftConstantsPass(ir.passes.InPlacePass):
    """Turn Constant nodes into initializers (main graph and subgraphs)."""

    visits_subgraphs = True
    # FixedPointGroup skips the pass while the model has none of these.
    trigger_ops = frozenset({"Constant"})

    def __init__(self, *, min_elements: int = 0) -> None:
        """Args:
        min_elements: Leave Constants with fewer elements than this as nodes.
        """
        super().__init__()
        if not isinstance(min_elements, int) or isinstance(min_elements, bool) or min_elements < 0:
            raise ValueError(f"min_elements must be a non-negative int, got {min_elements!r}")
        self.min_elements = min_elements

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        legacy_ir = model.ir_version < _IR_VERSION_SEPARATE_INITIALIZERS
        lifted = 0
        for node in list(iter_nodes(model.graph)):
            if self._try_lift(node, model.graph, legacy_ir):
                lifted += 1
        if lifted:
            logger.debug("lift-constants: lifted %d Constant nodes", lifted)
        return ir.passes.PassResult(model, modified=lifted > 0)

    def _try_lift(self, node: ir.Node, main_graph: ir.Graph, legacy_ir: bool) -> bool:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return False
        graph = node.graph
        output = node.outputs[0]
        if not isinstance(graph, ir.Graph):
            return False
        if legacy_ir and graph is not main_graph:
            logger.debug("lift-constants: %s is in a subgraph of an IR<4 model; left", output.name)
            return False
        if output.is_graph_output():
            logger.debug("lift-constants: %s is a graph output; left", output.name)
            return False
        tensor = _constant_tensor(node)
        if tensor is None or (self.min_elements and tensor.size < self.min_elements):
            return False
        initializer = ir.Value(
            name=output.name,
            shape=tensor.shape,
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
            metadata_props=output.metadata_props.copy(),
        )
        output.replace_all_uses_with(initializer)
        graph.remove(node, safe=True)
        graph.register_initializer(initializer)
        if legacy_ir:
            graph.inputs.append(initializer)
        return True


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a Constant node produces, or None for forms not lifted."""
    if len(node.attributes) != 1:
        logger.debug("lift-constants: Constant %s has %d attributes; left", node.name, len(node.attributes))
        return None
    (attr_name, attr), = node.attributes.items()
    if attr.is_ref():
        logger.debug("lift-constants: Constant %s refers to a function attribute; left", node.name)
        return None
    name = node.outputs[0].name
    if attr_name == "value" and attr.type == ir.AttributeType.TENSOR:
        # attr.value, not attr.as_tensor(): the latter's isinstance check
        # against a typing Protocol dominates the pass on 100k-node graphs.
        return attr.value
    if attr_name in _NUMERIC_ATTRIBUTE_DTYPES:
        # ir.Tensor, not ir.tensor: the latter's Protocol checks cost ~60 us per call.
        return ir.Tensor(np.asarray(attr.value, dtype=_NUMERIC_ATTRIBUTE_DTYPES[attr_name]), name=name)
    if attr_name in ("value_string", "value_strings"):
        strings = attr.value if attr_name == "value_strings" else [attr.value]
        encoded = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
        array = np.asarray(encoded, dtype=object)
        return ir.StringTensor(array if attr_name == "value_strings" else array.reshape(()), name=name)
    logger.debug("lift-constants: Constant %s has %s; left", node.name, attr_name)
    return None
