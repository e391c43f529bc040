"""Set BatchNormalization running statistics from the data, in one forward pass.

With random weights, BatchNormalization running statistics drawn at random
(mean ~ N(0, 0.05), var ~ U(0.5, 1.5)) do not normalize anything: the layer
passes its input's scale straight through. In a plain chain He-normal weights
keep that scale steady, but a residual network adds every branch to the trunk,
so the scale compounds: ResNet-50 reaches activations around 1e4 and
ShuffleNet around 1e5, and the softmax saturates to one-hot.

A trained network does not look like that: its running statistics match the
activations it sees. ``calibrate_batch_norm`` makes them match on the sample
feed. It runs a probe copy of the model in which every calibrated
``BatchNormalization(x, scale, bias, mean, var)`` is replaced by
``InstanceNormalization(x, scale, bias)`` with the same epsilon. With a batch
of one, instance statistics are the per-channel statistics over the spatial
axes, so every probe layer normalizes exactly, and the input it sees is the
input the calibrated BatchNormalization will see. One pass therefore yields
every layer's statistics at once, with no layer-by-layer re-running. Writing
those statistics into ``mean`` and ``var`` makes the model compute what the
probe computed (up to float rounding).

Only BatchNormalization nodes with a single output, an input of rank 3 or
more, and mean/var initializers read by no other node are calibrated; others
keep their values. The probe runs on one thread, so the result is the same on
every run on a given machine (kernels may still differ across CPU types).
"""

from __future__ import annotations

__all__ = ["calibrate_batch_norm"]

import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from model_zoo.shapes import static_shapes

logger = logging.getLogger(__name__)

# Channel variance floor: keeps var strictly positive for channels that are constant on the feed.
_MIN_VARIANCE = 1e-6


def calibrate_batch_norm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Overwrite BatchNormalization running mean and variance with their input's statistics on ``feeds``.

    Args:
        model: Modified in place. Its graph inputs must be exactly the feeds.
        feeds: One sample with batch size 1.

    Returns:
        How many BatchNormalization nodes were calibrated.

    Raises:
        ValueError: A feed has a batch size other than 1.
    """
    if any(array.ndim and array.shape[0] != 1 for array in feeds.values()):
        raise ValueError("BatchNormalization calibration needs feeds with batch size 1")
    nodes = _calibratable(model)
    if not nodes:
        return 0
    inputs = _run_probe(_probe(model, nodes), [node.input[0] for node in nodes], feeds)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node, activation in zip(nodes, inputs, strict=True):
        axes = (0, *range(2, activation.ndim))
        mean = activation.mean(axis=axes, dtype=np.float64)
        var = np.maximum(activation.var(axis=axes, dtype=np.float64), _MIN_VARIANCE)
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            dtype = numpy_helper.to_array(initializers[name]).dtype
            initializers[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    logger.debug("calibrated %d BatchNormalization nodes", len(nodes))
    return len(nodes)


def _calibratable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """BatchNormalization nodes whose statistics can be rewritten without touching another node."""
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    reads = Counter(name for node in graph.node for name in node.input)
    nodes = [
        node
        for node in graph.node
        if node.op_type == "BatchNormalization"
        and node.domain in ("", "ai.onnx")
        and len(node.output) == 1
        and all(node.input[i] in initializers and reads[node.input[i]] == 1 for i in (3, 4))
    ]
    if not nodes:
        return []
    shapes = static_shapes(model)
    return [node for node in nodes if len(shapes.get(node.input[0], ())) >= 3]


def _probe(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A copy where ``nodes`` normalize by instance statistics and expose their inputs as outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    targets = {node.output[0] for node in nodes}
    for node in probe.graph.node:
        if node.op_type != "BatchNormalization" or node.output[0] not in targets:
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        inputs = list(node.input[:3])
        node.op_type = "InstanceNormalization"
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("epsilon", epsilon))
    existing = {value.name for value in probe.graph.output}
    for node in nodes:
        if node.input[0] not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
    return probe


def _run_probe(probe: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs: list[np.ndarray] = session.run(names, feeds)
    return outputs
