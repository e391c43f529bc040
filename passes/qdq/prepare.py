"""What the ``qdq`` pass does to a model before quantizing it, and its refusals.

Weights must be initializers (lift-constants), BatchNorms folded into the
layers before them, and the opset recent enough for per-axis (13) or
block-wise int4 (21) Q/DQ: onnx's version converter upgrades it, or the
pass refuses with the converter's reason. A model onnxruntime cannot open
is refused before anything changes, since calibration runs it.
"""

from __future__ import annotations

__all__ = ["onnx_opset", "prepare", "check_runnable", "name_unnamed_nodes", "unname"]

import logging
import os
from collections import Counter
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from graphopt.errors import GraphoptError, UnsupportedModelError, first_line
from graphopt.graphs import iter_graphs
from graphopt.pipeline import adopt_model
from graphopt.runtime import ModelRunner
from graphopt.serialization import set_base_dir
from graphopt.summary import custom_ops, unknown_ops
from graphopt.support import check_supported
from passes.fold.batchnorm import FoldBatchNormPass
from passes.lift_constants import LiftConstantsPass

logger = logging.getLogger(__name__)


def onnx_opset(model: ir.Model) -> int:
    """The model's default-domain (ai.onnx) opset version; 1 when it imports none."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def prepare(model: ir.Model, opset: int) -> None:
    """Weights as initializers, BatchNorms folded, and an opset with the Q/DQ features needed."""
    version = onnx_opset(model)
    if version < opset:
        _upgrade(model, opset, version)
    LiftConstantsPass()(model)
    FoldBatchNormPass(standalone=False)(model)
    _two_input_sums_to_add(model.graph)


def _two_input_sums_to_add(graph: ir.Graph) -> None:
    """Sum(a, b) becomes Add(a, b), the same function: onnxruntime has an int8 Add and no int8 Sum.

    ResNet exports from Caffe2 join every residual with a two-input Sum.
    """
    for node in list(graph):
        if node.op_type == "Sum" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            add = ir.node("Add", list(node.inputs), name=node.name or None)
            graph.insert_before(node, add)
            node.outputs[0].replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.outputs[0].name, add.outputs[0].shape, add.outputs[0].type = (
                node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
            )
            graph.remove(node, safe=True)


def check_runnable(model: ir.Model, threads: int | None) -> None:
    """Refuses, before anything changes, a model that onnxruntime cannot run for calibration.

    A session is opened only when custom-domain or unknown ops make that doubtful.

    Raises:
        UnsupportedModelError: Naming the op, domain or opset onnxruntime lacks.
    """
    try:
        check_supported(model)
        if custom_ops(model) or unknown_ops(model):
            ModelRunner(model, threads=threads).close()
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"qdq measures the model by running it, but {first_line(exc)}") from exc


def _upgrade(model: ir.Model, opset: int, version: int) -> None:
    unknown = unknown_ops(model)
    if unknown:
        raise UnsupportedModelError(
            f"qdq needs opset {opset} or later and the model has {version}; onnx's version converter "
            f"cannot upgrade ops it does not know: {', '.join(unknown)}"
        )
    proto = ir.to_proto(model)
    where = ""
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        # The converter drops the model's local functions: each body is upgraded apart and put back.
        functions = []
        for function in proto.functions:
            where = f" on local function {function.domain}:{function.name}"
            functions.append(_upgrade_function(function, opset))
    except UnsupportedModelError:
        raise
    except Exception as exc:  # the converter raises bare RuntimeErrors and others
        raise GraphoptError(
            f"qdq needs opset {opset} or later and the model has {version}; onnx's version converter failed{where}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    del converted.functions[:]
    converted.functions.extend(functions)
    upgraded = ir.serde.deserialize_model(converted)
    base = _external_base_dir(model)
    if base is not None:
        # The protobuf round trip keeps external data as paths relative to the model's
        # folder, which onnx_ir would otherwise resolve from the working directory.
        set_base_dir(upgraded, base)
    adopt_model(model, upgraded)
    logger.info("qdq: upgraded the model from opset %d to %d", version, opset)


def _upgrade_function(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """``function`` with its standard ops upgraded to ``opset``, through a graph holding its body.

    onnx's version converter takes models only, and the checker refuses a
    function whose ops are older than the model's opset import.

    Raises:
        UnsupportedModelError: The body references the function's attributes,
            which the converter would silently replace by defaults.
    """
    imports = {entry.domain: entry.version for entry in function.opset_import}
    version = imports.get("", imports.get("ai.onnx"))
    if version is None or version >= opset:
        return function
    label = f"{function.domain}:{function.name}"
    if _references_attributes(function.node):
        raise UnsupportedModelError(
            f"qdq needs opset {opset} or later and local function {label} has {version}; its body reads the "
            "function's attributes, which onnx's version converter would lose"
        )
    body = onnx.helper.make_graph(
        list(function.node), function.name,
        [onnx.ValueInfoProto(name=name) for name in function.input],
        [onnx.ValueInfoProto(name=name) for name in function.output],
    )
    converted = onnx.version_converter.convert_version(
        onnx.helper.make_model(body, opset_imports=list(function.opset_import)), opset
    )
    upgraded = onnx.FunctionProto()
    upgraded.CopyFrom(function)
    del upgraded.node[:]
    upgraded.node.extend(converted.graph.node)
    del upgraded.opset_import[:]
    upgraded.opset_import.extend(converted.opset_import)
    logger.info("qdq: upgraded local function %s from opset %d to %d", label, version, opset)
    return upgraded


def _references_attributes(nodes: Iterable[onnx.NodeProto]) -> bool:
    """Whether any node, or any node of its subgraphs, takes an attribute from the enclosing function."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.ref_attr_name:
                return True
            bodies = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            if any(_references_attributes(body.node) for body in bodies):
                return True
    return False


def _external_base_dir(model: ir.Model) -> str | None:
    """The folder the model's external data paths are relative to, if it has any."""
    for graph in iter_graphs(model):
        if not isinstance(graph, ir.Graph):  # a function: no initializers
            continue
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return os.fspath(value.const_value.base_dir)
    return None


def name_unnamed_nodes(model: ir.Model) -> dict[str, str]:
    """Gives each main-graph node without a name of its own one (``MatMul_0``, ``gemm_1``, ...).

    Mixed precision, the speed guard and int8 storage tell layers apart by
    name, and ``exclude`` matches op types too: unnamed, every layer went by
    "" (or its op type), so keeping one float kept them all float; two
    nodes sharing a name went float together. Returns given name -> the
    node's old name ("" when it had none), for :func:`unname`.
    """
    taken = {node.name for graph in iter_graphs(model) for node in graph if node.name}
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    given: dict[str, str] = {}
    for node in model.graph:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        name = f"{base}_{counts[base]}"
        while name in taken:
            counts[base] += 1
            name = f"{base}_{counts[base]}"
        counts[base] += 1
        given[name] = node.name or ""
        node.name = name
        taken.add(name)
        seen.add(name)
    return given


def unname(model: ir.Model, given: dict[str, str]) -> None:
    """Gives the main graph's nodes back the names :func:`name_unnamed_nodes` replaced."""
    for node in model.graph:
        if node.name in given:
            node.name = given[node.name]
