"""Where onnx_ir's serialization falls short of "nothing lost", and graphopt's way around it.

- ``set_base_dir``: onnx_ir's own walks nodes with its generic recursive
  iterator (0.15 s on an 80k-node graph) and skips functions, whose external
  tensors then read from the working directory.
- ``attribute_tensors_read_in``: onnx_ir's save moves initializers into the
  new data file but leaves a tensor attribute (a Constant's value) pointing
  at its old file; a session opened from bytes cannot read it at all.
- ``initializer_types_hidden``: onnx_ir writes a value_info entry repeating
  every typed initializer's dtype and dims, so an unchanged model grew on
  every save.
- ``initializers_read_in``: without ``external_data``, onnx_ir's save keeps
  an external initializer's reference to its old file; to write one
  self-contained file, the tensors are read in first.

Each is a context manager or an in-place fix that leaves the model as it was
found once the save is done.
"""

from __future__ import annotations

__all__ = [
    "external_tensors",
    "set_base_dir",
    "attribute_tensors_read_in",
    "initializers_read_in",
    "initializer_types_hidden",
    "in_memory",
]

import contextlib
import os
from collections.abc import Iterator

import onnx_ir as ir

from graphopt.graphs import iter_graphs, iter_tensor_attributes, iter_tensors


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """Every tensor the model reads from a data file: initializers and tensor attributes, functions included."""
    return [tensor for tensor in iter_tensors(model) if isinstance(tensor, ir.ExternalTensor)]


def set_base_dir(model: ir.Model, base_dir: str | os.PathLike[str]) -> None:
    """Points every external tensor of the model, in any graph or function, at data files in ``base_dir``."""
    for tensor in external_tensors(model):
        tensor.base_dir = str(base_dir)


@contextlib.contextmanager
def attribute_tensors_read_in(model: ir.Model) -> Iterator[None]:
    """Within the block, tensor attributes that live in data files (a Constant's value) are in-memory tensors.

    onnx_ir's save moves initializers into the new data file but writes an
    external tensor attribute as it stands: pointing at its old file,
    relative to the new model, where that file is not; a session opened from
    bytes has no folder to resolve it against at all. Read in, it is
    embedded in the protobuf. The model gets its own attributes back after.
    """
    # Listed first: the swaps below replace attributes of the nodes being walked.
    lent = [
        (node, attr) for node, attr in iter_tensor_attributes(model)
        if any(isinstance(tensor, ir.ExternalTensor) for tensor in _tensors_of(attr))
    ]
    swapped: list[tuple[ir.Node, ir.Attr]] = []
    try:
        for node, attr in lent:
            read = [in_memory(tensor) if isinstance(tensor, ir.ExternalTensor) else tensor for tensor in _tensors_of(attr)]
            node.attributes[attr.name] = (
                ir.AttrTensor(attr.name, read[0], attr.doc_string)
                if attr.type == ir.AttributeType.TENSOR
                else ir.AttrTensors(attr.name, read, attr.doc_string)
            )
            swapped.append((node, attr))
        yield
    finally:  # also when reading one in failed: the ones already swapped go back
        for node, attr in swapped:
            node.attributes[attr.name] = attr


@contextlib.contextmanager
def initializers_read_in(model: ir.Model) -> Iterator[None]:
    """Within the block, initializers that live in data files are in-memory tensors, of every graph.

    onnx_ir's save without ``external_data`` writes an external tensor "with
    the same external information": the new file would still read the old
    data file. Read in, the bytes are embedded in the protobuf. Costs memory
    for the weights (a copy out of the memory map) only while the block runs.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in iter_graphs(model):  # functions' subgraphs may hold initializers too
            if not isinstance(graph, ir.Graph):
                continue
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    value.const_value = in_memory(tensor)
                    swapped.append((value, tensor))
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def initializer_types_hidden(model: ir.Model) -> Iterator[None]:
    """Within the block, initializer values carry no type or shape of their own (the tensor has both).

    onnx_ir's serializer writes a value_info entry for every initializer
    with a type or shape, repeating the tensor's own dtype and dims: a load
    and save of an unchanged model grew (by 235 bytes on the zoo attention
    model, 11 entries).
    """
    hidden: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    for graph in iter_graphs(model, functions=False):
        if not isinstance(graph, ir.Graph):
            continue
        # An initializer that is also a graph input or output keeps its declared type:
        # the graph's input/output entries are written from it, and onnx requires one.
        declared = {*graph.inputs, *graph.outputs}
        for value in graph.initializers.values():
            if value in declared or value.metadata_props or value.doc_string or (value.type is None and value.shape is None):
                continue
            hidden.append((value, value.type, value.shape))
            value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def _tensors_of(attr: ir.Attr) -> list[ir.TensorProtocol]:
    return [attr.value] if attr.type == ir.AttributeType.TENSOR else list(attr.value)


def in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)
