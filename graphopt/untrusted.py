"""Checks that treat a model file as untrusted input, run before passes touch it.

``io.load`` calls ``check_file`` before parsing and ``check_model`` after, so a
hostile or broken model fails with a ``graphopt.errors`` exception instead of
reading outside its folder, allocating from declared sizes, or hanging a pass.
No check reads tensor data: sizes come from ``os.stat`` and protobuf field
lengths, and are computed with Python integers.

``check_file`` (the model path, before it is parsed):
    a regular file (not a FIFO or device, which could block or never end),
    not empty, and below protobuf's 2 GiB message limit.

``check_proto`` (the parsed ``ModelProto``, before ``onnx_ir`` sees it):
    names that ``onnx_ir``'s deserializer would silently merge or report
    without the name: a value defined twice in one graph (two node outputs,
    a node output and an input or initializer, two initializers, two inputs);
    sparse initializers, which ``onnx_ir`` drops.

``check_model`` (the ``onnx_ir.Model``):
    every tensor (initializers of every graph and subgraph, tensor attributes
    such as Constant ``value`` on every node, functions included) has a known
    data type, dims that are not negative, and exactly the stored elements or
    bytes its dims call for, in the one data field its type uses.
    External data: a location that is not empty, has no NUL, is relative, and
    resolves (symlinks followed) inside the model's folder; a regular file with
    one hard link (``onnx_ir`` refuses others on read); offset and length not
    negative, length equal to the tensor's size, and the file long enough.
    Graphs: value names defined once, every node input and graph output
    defined by a node, graph input, initializer or outer-scope value, and no
    cycle (checked in linear time, including values read by subgraphs).
    Nodes: every attribute has a type; ops onnx knows have the input and
    output counts, attribute names and types, and required attributes of
    their schema at the imported opset. Names and strings are valid UTF-8.

The module is longer than the usual 400 lines on purpose: every rule applied
to untrusted input is in one place, to be audited together.
"""

from __future__ import annotations

__all__ = ["check_file", "check_proto", "check_model"]

import logging
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import onnx
import onnx_ir as ir

from graphopt.errors import InvalidModelError, ModelLoadError, UnsafeModelError, UnsupportedModelError
from graphopt.gcpause import gc_paused
from graphopt.graphs import GraphLike, bodies, iter_graphs, iter_nodes

logger = logging.getLogger(__name__)

# protobuf refuses to parse a message of 2 GiB or more; a bigger "model" is
# usually the external data file passed by mistake, and parsing it would read
# all of it into memory first.
MAX_MODEL_FILE_BYTES = 2**31 - 1

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
# Elements per stored entry where it is not one: onnx_ir's TensorProtoTensor
# reads complex numbers as two entries and 4-bit and 2-bit values packed into
# one int32_data entry per byte.
_ENTRIES_PER_ELEMENT = {ir.DataType.COMPLEX64: 2, ir.DataType.COMPLEX128: 2}
_ELEMENTS_PER_ENTRY = {4: 2, 2: 4}


# --- the file ---------------------------------------------------------------


def check_file(path: Path) -> None:
    """Rejects files that must not be parsed at all (checked before any read)."""
    try:
        info = path.stat()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot stat ({exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeModelError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    if info.st_size > MAX_MODEL_FILE_BYTES:
        raise ModelLoadError(
            f"{path}: {info.st_size} bytes is over protobuf's 2 GiB limit, so it is not an ONNX model "
            "(is it the external data file?)"
        )


# --- the parsed proto -------------------------------------------------------


def check_proto(proto: onnx.ModelProto) -> None:
    """Rejects what ``onnx_ir.serde.deserialize_model`` would merge, drop or report without a name.

    Raises:
        InvalidModelError: A value name is defined twice in one graph, or an
            external data offset or length is not a non-negative integer.
        UnsupportedModelError: A graph has sparse initializers.
    """
    # One pass over every node: upb builds a Python wrapper per field access,
    # which dominates the cost on 100k-node graphs.
    scopes = [(proto.graph.name, proto.graph)] + [(function.name, function) for function in proto.functions]
    while scopes:
        name, scope = scopes.pop()
        subgraphs = _check_proto_scope(name, scope)
        scopes.extend((graph.name, graph) for graph in subgraphs)


def _check_proto_scope(name: str, scope: onnx.GraphProto | onnx.FunctionProto) -> list[onnx.GraphProto]:
    """Checks one graph or function; returns the subgraphs its nodes hold."""
    if isinstance(scope, onnx.FunctionProto):
        inputs, initializers = list(scope.input), []
    else:
        if len(scope.sparse_initializer):
            sparse = scope.sparse_initializer[0].values.name
            raise UnsupportedModelError(f"graph {name!r}: sparse initializer {sparse!r} is not supported")
        inputs, initializers = [info.name for info in scope.input], list(scope.initializer)
    _no_repeats(name, inputs, "graph input")
    _no_repeats(name, [tensor.name for tensor in initializers], "initializer")
    defined = set(inputs) | {tensor.name for tensor in initializers}  # an initializer may give an input its default
    tensors, subgraphs = initializers, []
    for node in scope.node:
        for output in node.output:
            if output in defined:
                raise InvalidModelError(
                    f"graph {name!r}: value {output!r} is defined twice (again by node {node.name or node.op_type!r})"
                )
            if output:
                defined.add(output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                tensors.extend(attr.tensors)
            elif attr.type == onnx.AttributeProto.GRAPH:
                subgraphs.append(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                subgraphs.extend(attr.graphs)
    for tensor in tensors:
        _check_external_numbers(tensor)
    return subgraphs


def _check_external_numbers(tensor: onnx.TensorProto) -> None:
    # onnx's ExternalDataInfo raises on these inside the deserializer, where
    # onnx_ir's error wrapper loses the message.
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return
    for entry in tensor.external_data:
        if entry.key in ("offset", "length") and not _is_count(entry.value):
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data {entry.key} {entry.value!r} is not a non-negative integer"
            )


def _is_count(text: str) -> bool:
    try:
        return int(text) >= 0
    except ValueError:
        return False


def _no_repeats(graph_name: str, names: list[str], kind: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidModelError(f"graph {graph_name!r}: {kind} {name!r} is defined twice")
        seen.add(name)


# --- the IR model -----------------------------------------------------------


def check_model(model: ir.Model, base_dir: Path | None) -> None:
    """Rejects models whose tensors or graph break the rules passes rely on.

    Args:
        model: The freshly deserialized model.
        base_dir: The folder external data must stay inside; ``None`` when the
            model did not come from a file.

    Raises:
        UnsafeModelError: External data lies outside ``base_dir`` or is not a
            regular file, or the model has external data but no ``base_dir``.
        ModelLoadError: An external data file is missing or too short.
        InvalidModelError: A tensor's data disagrees with its dims or type, or
            the graph repeats a name, reads an undefined value or has a cycle.
    """
    with gc_paused():
        # Each graph's node list is taken once: walking onnx_ir's linked list
        # dominates the cost of these checks on 100k-node graphs.
        graphs = [(graph, list(graph)) for graph in iter_graphs(model)]
        _check_text(model, graphs)
        files = _ExternalFiles(base_dir)
        for label, tensor in _tensors(graphs):
            expected = _check_tensor(label, tensor)
            if isinstance(tensor, ir.ExternalTensor):
                files.check(label, tensor, expected)
        model_schemas = _Schemas(model.opset_imports)
        for graph, nodes in graphs:
            schemas = _Schemas(graph.opset_imports) if isinstance(graph, ir.Function) else model_schemas
            for node in nodes:
                schemas.check(node)
            _check_unique_names(graph, nodes)
            _check_reads_defined(graph, nodes)
            _check_acyclic(graph, nodes)


def _check_text(model: ir.Model, graphs: list[tuple[GraphLike, list[ir.Node]]]) -> None:
    """Every name and string the IR copied from the proto is ``str``.

    ONNX's proto2 schema does not validate UTF-8, and upb hands an invalid
    string field back as ``bytes``, which breaks schema lookups, formatting and
    serialization far from the load.
    """
    texts: list[object] = [model.producer_name, model.producer_version, model.domain, model.doc_string]
    texts += model.opset_imports
    texts += _flat(model.metadata_props)
    for graph, nodes in graphs:
        texts += (graph.name, graph.doc_string, *_flat(graph.metadata_props))
        values = [*graph.inputs, *graph.outputs]
        if isinstance(graph, ir.Graph):
            values += graph.initializers.values()
        else:
            texts += (graph.domain, graph.overload, *graph.attributes)
        for node in nodes:
            texts += (node.name, node.op_type, node.domain, node.overload, node.doc_string, *_flat(node.metadata_props))
            for attr in node.attributes.data.values():
                texts += (attr.name, attr.doc_string)
            values += node.outputs
        for value in values:
            texts += (value.name, value.doc_string, *_flat(value.metadata_props))
            if value.shape is not None:
                texts += (value.shape.get_denotation(i) for i in range(len(value.shape)))
    # upb returns bytes, never another type, for a string it cannot decode.
    bad = next((text for text in texts if isinstance(text, bytes)), None)
    if bad is not None:
        raise InvalidModelError(f"the model has a name or string that is not valid UTF-8: {bad!r:.60}")


def _flat(props: dict[str, str]) -> list[str]:
    return [text for item in props.items() for text in item] if props else []


def _tensors(graphs: list[tuple[GraphLike, list[ir.Node]]]) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Every initializer and every tensor attribute, labelled for error messages."""
    for graph, nodes in graphs:
        if isinstance(graph, ir.Graph):
            for name, value in graph.initializers.items():
                if value.const_value is not None:
                    yield name, value.const_value
        for node in nodes:
            for attr in node.attributes.data.values():
                if attr.is_ref():
                    continue
                label = f"{node.name or node.op_type}.{attr.name}"
                if attr.type == ir.AttributeType.TENSOR:
                    yield label, attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from ((f"{label}[{i}]", tensor) for i, tensor in enumerate(attr.value))


def _check_tensor(label: str, tensor: ir.TensorProtocol) -> int:
    """Checks dtype, dims and stored data; returns the bytes the dims call for (0 for strings)."""
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
    try:
        dtype = tensor.dtype  # lazy on TensorProtoTensor: an unknown number raises here
    except ValueError as exc:
        raise InvalidModelError(f"tensor {label!r}: unknown data type ({exc})") from exc
    if dtype == ir.DataType.UNDEFINED:
        raise InvalidModelError(f"tensor {label!r}: data type is UNDEFINED")
    texts = [tensor.name, tensor.doc_string, getattr(tensor, "location", None), *_flat(tensor.metadata_props)]
    if any(isinstance(text, bytes) for text in texts):
        raise InvalidModelError(f"tensor {label!r}: a name or string is not valid UTF-8")
    dims = list(proto.dims) if proto is not None else list(tensor.shape)
    if any(not isinstance(d, int) or d < 0 for d in dims):
        raise InvalidModelError(f"tensor {label!r}: invalid dims {dims}")
    count = math.prod(dims)  # a Python int: absurd dims never overflow or allocate
    if dtype == ir.DataType.STRING:
        if isinstance(tensor, ir.ExternalTensor):
            raise InvalidModelError(f"tensor {label!r}: string tensors cannot be stored as external data")
        _check_strings(label, tensor, proto, count)
        return 0
    try:
        expected = (count * dtype.bitwidth + 7) // 8
    except TypeError as exc:  # a data type with no fixed size, e.g. a future one
        raise InvalidModelError(f"tensor {label!r}: unsupported data type {dtype.name}") from exc
    if proto is not None:
        _check_stored_data(label, proto, dtype, count, expected)
    return expected


def _check_strings(label: str, tensor: ir.TensorProtocol, proto: onnx.TensorProto | None, count: int) -> None:
    if proto is not None and proto.HasField("raw_data"):
        raise InvalidModelError(f"tensor {label!r}: a string tensor cannot use raw_data")
    stored = len(proto.string_data) if proto is not None else len(getattr(tensor, "raw", ()))
    if stored != count:
        raise InvalidModelError(f"tensor {label!r}: dims call for {count} strings but {stored} are stored")


def _check_stored_data(label: str, proto: onnx.TensorProto, dtype: ir.DataType, count: int, expected: int) -> None:
    """One data field, holding exactly what the dims call for (the checker's rule, without its int64 overflow)."""
    used = [field for field in _TYPED_FIELDS if len(getattr(proto, field))]
    if proto.HasField("raw_data"):
        if used:
            raise InvalidModelError(f"tensor {label!r}: has raw_data and {used[0]}")
        stored = len(proto.raw_data)  # protobuf copies the bytes; there is no length-only accessor
        if stored != expected:
            raise InvalidModelError(
                f"tensor {label!r}: dims {list(proto.dims)} call for {expected} bytes but {stored} are stored"
            )
        return
    try:
        field = onnx.helper.tensor_dtype_to_field(dtype.value)
    except KeyError as exc:
        raise InvalidModelError(f"tensor {label!r}: data type {dtype.name} has no typed data field") from exc
    if any(name != field for name in used):
        raise InvalidModelError(f"tensor {label!r}: a {dtype.name} tensor cannot store data in {used[0]}")
    packed = _ELEMENTS_PER_ENTRY.get(dtype.bitwidth, 1)
    entries = -(-count // packed) * _ENTRIES_PER_ELEMENT.get(dtype, 1)
    stored = len(getattr(proto, field))
    if stored != entries:
        raise InvalidModelError(
            f"tensor {label!r}: dims {list(proto.dims)} call for {entries} {field} entries but {stored} are stored"
        )


class _ExternalFiles:
    """Checks external data locations, resolving and stat-ing each file once."""

    def __init__(self, base_dir: Path | None) -> None:
        self._root = os.path.realpath(base_dir) if base_dir is not None else ""
        self._sizes: dict[str, int] = {}

    def check(self, label: str, tensor: ir.ExternalTensor, expected: int) -> None:
        """Location first, then file type and size; never opens the file."""
        location = os.fspath(tensor.location)
        if not self._root:
            raise UnsafeModelError(
                f"tensor {label!r} reads external data {location!r} but the model has no folder; "
                "pass the model's path to graphopt.load"
            )
        where = f"tensor {label!r}: external data {location!r}"
        if not location or "\0" in location:
            raise UnsafeModelError(f"{where}: location is empty or contains NUL")
        if os.path.isabs(location) or PureWindowsPath(location).anchor:
            raise UnsafeModelError(f"{where}: location must be relative to the model's folder")
        path = tensor.path  # exactly the file onnx_ir would open
        if path not in self._sizes:
            self._sizes[path] = self._size_of(where, path, os.fspath(tensor.base_dir))
        offset, length = tensor.offset or 0, tensor.length
        if offset < 0 or (length is not None and length < 0):
            raise InvalidModelError(f"{where}: negative offset or length")
        if length is not None and length != expected:
            raise InvalidModelError(f"{where}: length {length} but dims {list(tensor.shape)} call for {expected} bytes")
        if offset + expected > self._sizes[path]:
            raise ModelLoadError(
                f"{where}: file has {self._sizes[path]} bytes, too few for {expected} bytes at offset {offset}"
            )

    def _size_of(self, where: str, path: str, tensor_base: str) -> int:
        # The folder is the tensor's base_dir, the model's folder as the user
        # named it. onnx_ir checks containment in it on every read (lexically
        # and with symlinks resolved) and raises ValueError; checking here
        # turns that late crash into an error at load. An empty base_dir
        # (a bare file name, or a tensor onnx_ir did not reach) makes onnx_ir
        # skip its check and read relative to the working directory, so the
        # folder io.load resolved stands in.
        if tensor_base and not _inside(os.path.abspath(path), os.path.abspath(tensor_base)):
            raise UnsafeModelError(f"{where}: resolves outside the model's folder")
        real = os.path.realpath(path)
        if not _inside(real, os.path.realpath(tensor_base) if tensor_base else self._root):
            raise UnsafeModelError(f"{where}: resolves outside the model's folder")
        try:
            info = os.stat(real)
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{where}: file not found next to the model") from exc
        except OSError as exc:
            raise ModelLoadError(f"{where}: cannot stat ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeModelError(f"{where}: not a regular file")
        if info.st_nlink > 1:
            raise UnsafeModelError(
                f"{where}: file has {info.st_nlink} hard links, which onnx_ir refuses to read; copy it"
            )
        return info.st_size


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normcase(os.path.normpath(path)), os.path.normcase(os.path.normpath(root))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class _Rules:
    """What one operator schema requires of a node."""

    inputs: range
    outputs: range
    attribute_types: dict[str, int]
    required: tuple[str, ...]


class _Schemas:
    """Checks nodes against their operator schema at one set of opset imports.

    Ops onnx does not know (custom domains, or missing from the imports) are
    left alone apart from the attribute-type check every node gets.
    """

    def __init__(self, opsets: dict[str, int]) -> None:
        self._opsets = opsets
        self._rules: dict[tuple[str, str], _Rules | None] = {}

    def check(self, node: ir.Node) -> None:
        """Arity and attribute types, which passes index into without checking."""
        key = (node.domain, node.op_type)
        rules = self._rules[key] if key in self._rules else self._rules.setdefault(key, self._lookup(*key))
        attributes = node.attributes.data
        for name, attr in attributes.items():
            if attr.is_ref():
                known = rules is None or name in rules.attribute_types
            elif attr.type == ir.AttributeType.UNDEFINED:
                known = False
            else:
                known = rules is None or rules.attribute_types.get(name) == attr.type.value
            if not known:
                raise InvalidModelError(f"{_label(node)}: attribute {name!r} is unknown, untyped or of the wrong type")
        if rules is None:
            return
        if len(node.inputs) not in rules.inputs or len(node.outputs) not in rules.outputs:
            raise InvalidModelError(
                f"{_label(node)}: {len(node.inputs)} inputs and {len(node.outputs)} outputs do not fit its schema"
            )
        missing = [name for name in rules.required if name not in attributes]
        if missing:
            raise InvalidModelError(f"{_label(node)}: required attribute {missing[0]!r} is missing")

    def _lookup(self, domain: str, op_type: str) -> _Rules | None:
        domain = "" if domain == "ai.onnx" else domain
        version = self._opsets.get(domain, self._opsets.get("ai.onnx")) if domain == "" else self._opsets.get(domain)
        if version is None:
            return None
        try:
            schema = onnx.defs.get_schema(op_type, version, domain)
        except onnx.defs.SchemaError:
            logger.debug(
                "no onnx schema for %s::%s at opset %s; its arity and attributes are not checked",
                domain,
                op_type,
                version,
            )
            return None
        return _Rules(
            inputs=range(schema.min_input, schema.max_input + 1),
            outputs=range(schema.min_output, schema.max_output + 1),
            attribute_types={name: int(spec.type.value) for name, spec in schema.attributes.items()},
            required=tuple(name for name, spec in schema.attributes.items() if spec.required),
        )


def _label(node: ir.Node) -> str:
    return f"node {node.name or node.op_type!r} ({node.op_type})"


def _check_unique_names(graph: GraphLike, nodes: list[ir.Node]) -> None:
    owner: dict[str, ir.Value] = {}
    defined = [*graph.inputs]
    if isinstance(graph, ir.Graph):
        defined += graph.initializers.values()
    defined += (value for node in nodes for value in node.outputs)
    for value in defined:
        if not value.name:
            continue
        first = owner.setdefault(value.name, value)
        if first is not value:
            raise InvalidModelError(f"graph {graph.name!r}: value {value.name!r} is defined twice")


def _check_reads_defined(graph: GraphLike, nodes: list[ir.Node]) -> None:
    # Outer-scope values pass: they have a producer or are an input or
    # initializer of the graph that owns them.
    for node in nodes:
        for value in node.inputs:
            if value is not None and _removed_producer(value):
                _refuse_removed(f"node {node.name or node.op_type!r}", value)
            if value is not None and _undefined(value):
                raise InvalidModelError(
                    f"node {node.name or node.op_type!r} reads {value.name!r}, "
                    "which no node, graph input or initializer defines"
                )
    for value in graph.outputs:
        if _removed_producer(value):
            _refuse_removed(f"graph {graph.name!r}'s output", value)
        if _undefined(value):
            raise InvalidModelError(f"graph {graph.name!r}: output {value.name!r} is not produced by any node")


def _undefined(value: ir.Value) -> bool:
    return value.producer() is None and not value.is_graph_input() and not value.is_initializer()


def _removed_producer(value: ir.Value) -> bool:
    # A model a pass rewrote in memory (checked before it is saved): a value whose node was
    # removed still names it as its producer, yet once saved nothing defines the value.
    producer = value.producer()
    return producer is not None and producer.graph is None


def _refuse_removed(reader: str, value: ir.Value) -> None:
    producer = value.producer()
    name = (producer.name or producer.op_type) if producer is not None else "?"
    raise InvalidModelError(f"{reader} reads {value.name!r}, whose producer {name!r} was removed")


def _check_acyclic(graph: GraphLike, nodes: list[ir.Node]) -> None:
    """Kahn's algorithm over the graph's nodes: O(nodes + edges)."""
    index = {id(node): i for i, node in enumerate(nodes)}
    successors: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for value in _reads(node):
            # Values from outer scopes or inner bodies have no index here.
            j = index.get(id(value.producer())) if value is not None else None
            if j is not None:
                successors[j].append(i)
                waiting[i] += 1
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        j = ready.pop()
        done += 1
        for i in successors[j]:
            waiting[i] -= 1
            if waiting[i] == 0:
                ready.append(i)
    if done < len(nodes):
        name = _name_on_cycle(nodes, index, waiting)
        raise InvalidModelError(f"graph {graph.name!r} has a cycle through value {name!r}")


def _reads(node: ir.Node) -> Sequence[ir.Value | None]:
    """The values ``node`` reads, directly or through its subgraphs."""
    held = bodies(node)
    if not held:
        return node.inputs
    reads = list(node.inputs)
    for body in held:
        reads.extend(body.outputs)  # a branch may output an outer value as is
        for inner in iter_nodes(body):
            reads.extend(inner.inputs)
    return reads


def _name_on_cycle(nodes: list[ir.Node], index: dict[int, int], waiting: list[int]) -> str:
    """Walks back from a node Kahn could not reach until a node repeats; it lies on a cycle."""
    seen: set[int] = set()
    i = next(k for k, count in enumerate(waiting) if count)
    name = ""
    while i not in seen:
        seen.add(i)
        for value in _reads(nodes[i]):
            j = index.get(id(value.producer())) if value is not None else None
            if j is not None and waiting[j]:
                i, name = j, value.name or ""
                break
    return name
