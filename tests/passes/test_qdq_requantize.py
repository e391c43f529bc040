"""qdq on a model that qdq already quantized in part: only what is new gets Q/DQ, and node names stay unique.

Found on digits_cnn (fold,qdq then qdq again): the first run left the first
conv float, the second quantized it and its Relu output again, whose
``<value>_quantized_node`` existed, and onnxruntime refused the model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from helpers import check_full, cosine, run_ort, to_proto

import model_zoo
from graphopt import load, run_pipeline
from passes.qdq import QuantizePass
from passes.qdq.rewrite import NodeMaker


def _calibration(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(count)]


def test_qdq_again_quantizes_only_the_layer_left_float_when_the_model_went_through_qdq_before():
    zoo = model_zoo.build("cnn_bn")
    model = load(zoo.model)
    run_pipeline(model, [QuantizePass(check_speed=False, exclude="conv_c1", data=_calibration())])
    first = Counter(node.op_type for node in model.graph)
    quantized_inputs = {node.inputs[0].name for node in model.graph if node.op_type == "QuantizeLinear"}

    second = QuantizePass(check_speed=False, data=_calibration())
    result = run_pipeline(model, [second])

    proto = to_proto(model)
    check_full(proto)
    names = Counter(node.name for node in proto.graph.node)
    assert [name for name, count in names.items() if count > 1] == []
    assert result.modified and second.summary.quantized == ["conv_c1"]
    # New: a Q/DQ pair on the image, DQs on conv_c1's weight and bias; the activations quantized before keep their one Q.
    again = Counter(node.op_type for node in model.graph)
    assert again["QuantizeLinear"] - first["QuantizeLinear"] == 1
    assert again["DequantizeLinear"] - first["DequantizeLinear"] == 3
    readers = Counter(node.inputs[0].name for node in model.graph if node.op_type == "QuantizeLinear")
    assert all(count == 1 for count in readers.values()) and quantized_inputs < set(readers)
    assert cosine(run_ort(proto, zoo.feeds)[0], run_ort(zoo.model, zoo.feeds)[0]) > 0.99


def test_node_maker_names_nodes_apart_from_the_nodes_already_in_the_graph():
    model = load(model_zoo.build("cnn_bn").model)
    taken = next(node for node in model.graph if node.op_type == "Relu")
    taken.name = "r_quantized_node"  # what an earlier qdq named its QuantizeLinear
    value = model.graph.node(0).outputs[0]

    with NodeMaker(model) as maker:
        made = maker.node("Identity", [value], "r_quantized")

    assert made.name == "r_quantized_node_1"
    assert made.outputs[0].name == "r_quantized"
    assert isinstance(made, ir.Node)
