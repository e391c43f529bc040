"""Static shapes by onnx shape inference, without serializing the weights."""

from __future__ import annotations

__all__ = ["static_shapes"]

import logging

import onnx

logger = logging.getLogger(__name__)

# Float tensors at least this large are never shape data (Resize scales and the
# like are tiny), so their bytes can be left out of the inference copy.
_STRIP_MIN_ELEMENTS = 1024
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shape of every value in the main graph whose rank shape inference knows.

    Shape inference serializes the whole model, which for VGG-19 (550 MB)
    takes seconds; large float initializers are therefore emptied in the copy
    that is inferred. Inference reads only their dims and type.

    Args:
        model: Not modified.

    Returns:
        Value name -> dims, with None for a dimension that is not a known number.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in skeleton.graph.initializer:
        if tensor.data_type in _FLOAT_TYPES and _elements(tensor) >= _STRIP_MIN_ELEMENTS:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
    graph = onnx.shape_inference.infer_shapes(skeleton).graph
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in (*graph.value_info, *graph.input, *graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for tensor in graph.initializer:
        shapes.setdefault(tensor.name, tuple(tensor.dims))
    return shapes


def _elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count
