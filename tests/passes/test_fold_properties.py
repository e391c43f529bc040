"""Property: fold keeps random Conv/BatchNorm/Mul/Add/Transpose/Reshape/MatMul chains valid and equal.

Error bound as in test_fold_group.py: weight-rewriting folds change float32
rounding, so outputs agree within 1e-4 of the largest output magnitude.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import check_full, run_ort
from hypothesis import given
from hypothesis import strategies as st

from graphopt import run_pipeline

pytestmark = pytest.mark.property  # examples bounded by the hypothesis profile (tests/conftest.py)

C, H, W = 4, 5, 5
_FLOAT = onnx.TensorProto.FLOAT
_STEPS = ("conv", "conv_nobias", "batchnorm", "mul", "add", "relu", "transpose_pair", "reshape_pair")


class _Chain:
    """Builds an NCHW chain; every step keeps the [1, C, H, W] shape."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.current = "x"

    def _const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(onnx.numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], **attrs) -> None:
        out = f"t{len(self.nodes)}"
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=f"n{len(self.nodes)}", **attrs))
        self.current = out

    def add(self, step: str) -> None:
        k = len(self.nodes)
        normal = self.rng.standard_normal
        if step.startswith("conv"):
            weight = self._const(f"w{k}", (normal((C, C, 3, 3)) * 0.2).astype(np.float32))
            inputs = [self.current, weight] + ([] if step == "conv_nobias" else [self._const(f"b{k}", (normal(C) * 0.1).astype(np.float32))])
            self._node("Conv", inputs, pads=[1, 1, 1, 1])
        elif step == "batchnorm":
            params = [
                self.rng.uniform(0.5, 1.5, C),
                normal(C) * 0.1,
                normal(C) * 0.1,
                self.rng.uniform(0.5, 1.5, C),
            ]
            names = [self._const(f"bn{k}_{i}", p.astype(np.float32)) for i, p in enumerate(params)]
            self._node("BatchNormalization", [self.current, *names])
        elif step in ("mul", "add"):
            shape = (C, 1, 1) if self.rng.random() < 0.7 else ()
            value = self.rng.uniform(0.5, 1.5, shape) if step == "mul" else normal(shape) * 0.1
            self._node(step.capitalize(), [self.current, self._const(f"c{k}", np.asarray(value, np.float32))])
        elif step == "relu":
            self._node("Relu", [self.current])
        elif step == "transpose_pair":
            self._node("Transpose", [self.current], perm=[0, 2, 3, 1])
            self._node("Transpose", [self.current], perm=[0, 3, 1, 2])
        else:
            self._node("Reshape", [self.current, self._const(f"s{k}", np.array([1, C * H * W], np.int64))])
            self._node("Reshape", [self.current, self._const(f"r{k}", np.array([1, C, H, W], np.int64))])

    def model(self) -> onnx.ModelProto:
        self._node("Flatten", [self.current])
        k = len(self.nodes)
        head = self._const(f"head{k}", (self.rng.standard_normal((C * H * W, 3)) * 0.1).astype(np.float32))
        self._node("MatMul", [self.current, head])
        self._node("Add", [self.current, self._const(f"hb{k}", np.zeros(3, np.float32) + 0.5)])
        graph = onnx.helper.make_graph(
            self.nodes,
            "chain",
            [onnx.helper.make_tensor_value_info("x", _FLOAT, [1, C, H, W])],
            [onnx.helper.make_tensor_value_info(self.current, _FLOAT, [1, 3])],
            self.inits,
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model)


@given(steps=st.lists(st.sampled_from(_STEPS), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_fold_keeps_random_chains_valid_and_equal(steps, seed):
    chain = _Chain(np.random.default_rng(seed))
    for step in steps:
        chain.add(step)
    proto = chain.model()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, C, H, W)).astype(np.float32)}

    result = run_pipeline(ir.serde.deserialize_model(proto), "fold")

    check_full(result.model)
    rewritten = ir.to_proto(result.model)
    assert len(rewritten.graph.node) <= len(proto.graph.node)
    # Inverse Transpose pairs always cancel; BatchNorm stays only where nothing can absorb it.
    assert "Transpose" not in {node.op_type for node in rewritten.graph.node}
    for node in rewritten.graph.node:
        if node.op_type == "BatchNormalization":
            producer = next((p for p in rewritten.graph.node if node.input[0] in p.output), None)
            assert producer is None or producer.op_type not in ("Conv", "Gemm", "MatMul"), producer
    want, got = run_ort(proto, feeds)[0], run_ort(rewritten, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.max(np.abs(want))) + 1e-5)
