"""Real architectures from the onnx package's "light" backend-test models.

The onnx wheel ships ``backend/test/data/light/light_<arch>.onnx``: full
ImageNet classifiers (ResNet-50, DenseNet-121, VGG-19, ...) whose large
weights were replaced by ``ConstantOfShape`` nodes reading small int64 shape
initializers, so every such weight is one repeated value (0.02). Small tensors
(some biases and BatchNormalization statistics) were kept with their trained
values. The files use ir_version 3, where every initializer is also listed as
a graph input, and opset 9.

``materialize`` turns such a model into an ordinary one:

* every ``ConstantOfShape`` whose shape is an initializer becomes an
  initializer of the same name and shape holding seeded random values, and the
  node and its now-unused shape initializer are removed;
* ir_version goes from 3 to 4 and the initializers leave ``graph.input``, so
  the only graph input left is the image. Under ir_version 3 an initializer
  must also be a graph input, which makes every weight overridable at run time
  and hides it from constant folding; ir_version 4 is the first that lets an
  initializer stand alone. Opset, producer and everything else stay as found.

Values are chosen by the role of the weight's consumer, found by following
layout-only ops (Unsqueeze, Reshape, ...) to the op that does arithmetic:
He-normal (std sqrt(2 / fan_in)) for Conv, Gemm and MatMul weights, N(0, 0.01)
for their biases, BatchNormalization scale ~ U(0.8, 1.2), bias and mean ~
N(0, 0.05) and variance ~ U(0.5, 1.5), and for the per-channel Mul / Add that
DenseNet-121 and Inception-v2 apply after BatchNormalization, U(0.8, 1.2) and
N(0, 0.05). He-normal keeps the second moment of ReLU activations constant
from layer to layer in a plain chain (AlexNet, VGG, Inception-v1, SqueezeNet).

That is not enough where residual branches add up (ResNet-50 reaches
activations around 1e4 and ShuffleNet 1e5, with a one-hot softmax), so
``build`` then sets every BatchNormalization's running mean and variance to
the statistics its input has on the sample feed, as in a trained network (see
``model_zoo.calibrate``). This replaces the drawn mean and variance, and the
trained statistics the light files kept for a few small layers, which do not
match random weights either.
"""

from __future__ import annotations

__all__ = ["LIGHT_DIR", "REAL_FILES", "REAL_BUILDERS", "materialize", "load_light"]

import functools
import logging
import math
import pathlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from model_zoo.calibrate import calibrate_batch_norm
from model_zoo.shapes import static_shapes
from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

LIGHT_DIR = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

REAL_FILES: dict[str, str] = {
    "resnet50": "light_resnet50.onnx",
    "densenet121": "light_densenet121.onnx",
    "inception_v1": "light_inception_v1.onnx",
    "inception_v2": "light_inception_v2.onnx",
    "squeezenet": "light_squeezenet.onnx",
    "shufflenet": "light_shufflenet.onnx",
    "vgg19": "light_vgg19.onnx",
    "alexnet": "light_bvlc_alexnet.onnx",
    "zfnet512": "light_zfnet512.onnx",
}

# Ops that only rearrange a weight's elements: the role is decided by what reads their output.
_LAYOUT_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose"})

# (op_type, input index) -> (kind, low-or-mean, high-or-std) for roles that need no fan-in.
_FIXED_ROLES: dict[tuple[str, int], tuple[str, float, float]] = {
    ("Conv", 2): ("normal", 0.0, 0.01),
    ("Gemm", 2): ("normal", 0.0, 0.01),
    ("BatchNormalization", 1): ("uniform", 0.8, 1.2),
    ("BatchNormalization", 2): ("normal", 0.0, 0.05),
    ("BatchNormalization", 3): ("normal", 0.0, 0.05),
    ("BatchNormalization", 4): ("uniform", 0.5, 1.5),
}
_MULTIPLICATIVE = ("uniform", 0.8, 1.2)
_ADDITIVE = ("normal", 0.0, 0.05)
_MULTIPLICATIVE_OPS = frozenset({"Mul", "Div"})
_ADDITIVE_OPS = frozenset({"Add", "Sub", "Sum"})

_Use = tuple[onnx.NodeProto, int]


def load_light(name: str) -> onnx.ModelProto:
    """The unmodified light model for a REAL name (weights still ConstantOfShape)."""
    return onnx.load(LIGHT_DIR / REAL_FILES[name])


def materialize(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of ``model`` with every constant-shaped ConstantOfShape turned into a random initializer.

    Works on the protobuf directly so that everything this does not touch
    (value_info, doc strings, metadata, node names) survives unchanged.

    Args:
        model: A light model; it is not modified.
        rng: Source of the weights, consumed in node order.

    Returns:
        The materialized model, with ir_version raised to at least 4 and the
        initializers removed from ``graph.input``.
    """
    shapes = static_shapes(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    uses = _uses(graph)
    kept_nodes, shape_names = [], set()
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or node.input[0] not in initializers:
            kept_nodes.append(node)
            continue
        dims = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        _add_initializer(graph, node.output[0], _sample(node, dims, uses, shapes, rng))
        shape_names.add(node.input[0])
    del graph.node[:]
    graph.node.extend(kept_nodes)
    # Before the shape tensors go: under ir_version 3 they are graph inputs too.
    _drop_initializer_inputs(out)
    unused = shape_names - set(_names_read(graph))
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in unused:
            del graph.initializer[index]
    logger.debug("materialized %d ConstantOfShape weights, removed %d shape tensors", len(shape_names), len(unused))
    return out


def _add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """Append ``array`` as an initializer, filling the message in place (VGG-19 holds 550 MB)."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = numpy_helper.tobytes_little_endian(array)


def _uses(graph: onnx.GraphProto) -> dict[str, list[_Use]]:
    """Value name -> (node, input index) for every read in this graph's own node list."""
    uses: dict[str, list[_Use]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                uses[name].append((node, index))
    return uses


def _names_read(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name read by a node of ``graph`` or of any subgraph in it, plus the graph outputs."""
    yield from (value.name for value in graph.output)
    for node in graph.node:
        yield from node.input
        for attribute in node.attribute:
            for body in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _names_read(body)


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Make initializers plain constants: ir_version 4 allows an initializer that is not a graph input."""
    model.ir_version = max(model.ir_version, 4)
    names = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _final_use(name: str, uses: dict[str, list[_Use]]) -> _Use | None:
    """The first arithmetic use of ``name``, looking through layout-only ops."""
    while uses.get(name):
        node, index = uses[name][0]
        if node.op_type not in _LAYOUT_OPS or index != 0:
            return node, index
        name = node.output[0]
    return None


def _sample(
    node: onnx.NodeProto,
    dims: tuple[int, ...],
    uses: dict[str, list[_Use]],
    shapes: dict[str, tuple[int | None, ...]],
    rng: np.random.Generator,
) -> np.ndarray:
    """Random values for one ConstantOfShape output, scaled by the role of its consumer."""
    fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
    if fill.dtype.kind != "f":
        # Integer or boolean fills are indices or masks, not weights: keep them exact.
        return np.full(dims, fill.reshape(()).item(), dtype=fill.dtype)
    use = _final_use(node.output[0], uses)
    kind, a, b = _role(node.output[0], use, shapes)
    # In place: VGG-19's largest weight alone has 103M values.
    if kind == "uniform":
        values = rng.random(dims, dtype=np.float32)
        values *= np.float32(b - a)
    else:
        values = rng.standard_normal(dims, dtype=np.float32)
        values *= np.float32(b)
    values += np.float32(a)
    return values.astype(fill.dtype, copy=False)


def _role(name: str, use: _Use | None, shapes: dict[str, tuple[int | None, ...]]) -> tuple[str, float, float]:
    """(distribution, parameter, parameter) for the weight ``name`` read by ``use``."""
    if use is None:
        logger.debug("%s has no arithmetic consumer; using a small normal", name)
        return _ADDITIVE
    node, index = use
    key = (node.op_type, index)
    if key in _FIXED_ROLES:
        return _FIXED_ROLES[key]
    if index == 1 and node.op_type in ("Conv", "Gemm", "MatMul"):
        return ("normal", 0.0, math.sqrt(2.0 / _fan_in(node, shapes)))
    if node.op_type in _MULTIPLICATIVE_OPS:
        return _MULTIPLICATIVE
    if node.op_type in _ADDITIVE_OPS:
        return _ADDITIVE
    logger.debug("%s feeds %s input %d, an unknown role; using a small normal", name, node.op_type, index)
    return _ADDITIVE


def _fan_in(node: onnx.NodeProto, shapes: dict[str, tuple[int | None, ...]]) -> int:
    """Inputs summed into one output element, from the weight's shape as the consumer sees it."""
    declared = shapes.get(node.input[1], (None,))
    shape = [d for d in declared if d is not None]
    if len(shape) != len(declared):
        raise ValueError(f"cannot infer the shape of weight {node.input[1]!r} read by {node.op_type} {node.name!r}")
    if node.op_type == "Conv":
        return math.prod(shape[1:])  # [M, C/group, k...]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return shape[1] if trans_b else shape[0]
    return shape[-2]  # MatMul: [..., K, N]


def _image_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal values for each graph input (the image, after materialization)."""
    feeds = {}
    for value in model.graph.input:
        dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        feeds[value.name] = rng.standard_normal(dims, dtype=np.float32)
    return feeds


def _build_real(name: str, seed: int) -> ZooModel:
    rng = np.random.default_rng(seed)
    model = materialize(load_light(name), rng)
    feeds = _image_feeds(model, rng)
    calibrate_batch_norm(model, feeds)
    return ZooModel(name, model, feeds)


REAL_BUILDERS: dict[str, Callable[[int], ZooModel]] = {
    name: functools.partial(_build_real, name) for name in REAL_FILES
}
