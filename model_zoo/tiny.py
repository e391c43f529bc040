"""Tiny hand-built models, each a pattern that graph rewrites care about.

Every model here uses opset 17 (default domain), ir_version 8 and float32.
Topology is written in onnx's textual syntax, which leaves weight names
unresolved; the weights are attached afterwards as initializers (or, for
``constant_weights``, as ``Constant`` nodes). Weights come from
``np.random.default_rng(seed)`` with He-normal scales for layers followed by
ReLU, so activations stay near unit variance and outputs are finite and not
saturated. The feeds are drawn from the same generator after the weights, so
a seed fixes both.
"""

from __future__ import annotations

__all__ = ["TINY_BUILDERS"]

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

_HEADER = '<ir_version: 8, opset_import: ["" : 17], producer_name: "graphopt.model_zoo">\n'


def _assemble(text: str, weights: dict[str, np.ndarray], *, as_constants: bool = False) -> onnx.ModelProto:
    """A model from textual topology plus named weights.

    Args:
        text: One graph in onnx's textual syntax, without the model header.
        weights: Arrays for the names the text reads but never defines.
        as_constants: Put each weight in a ``Constant`` node at the head of the
            graph instead of in an initializer.

    Returns:
        The assembled model.
    """
    model = onnx.parser.parse_model(_HEADER + text)
    # Named nodes, so that validation reports can point at "gemm_h", not at "".
    for node in model.graph.node:
        node.name = node.name or f"{node.op_type.lower()}_{node.output[0]}"
    tensors = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    if as_constants:
        nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in tensors]
        # Constants first keeps the node list topologically sorted.
        nodes.extend(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    else:
        model.graph.initializer.extend(tensors)
    return model


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He-normal weights, std sqrt(2 / fan_in): keeps ReLU activations near unit scale."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _batch_norm(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    """Non-trivial BatchNormalization parameters with a strictly positive variance."""
    return {
        f"{prefix}_scale": rng.uniform(0.8, 1.2, channels).astype(np.float32),
        f"{prefix}_bias": _normal(rng, (channels,), 0.05),
        f"{prefix}_mean": _normal(rng, (channels,), 0.05),
        f"{prefix}_var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    }


def _build_mlp(seed: int) -> ZooModel:
    """Gemm(transB=1) + Relu, then Gemm(transB=0); the batch dimension is symbolic."""
    rng = np.random.default_rng(seed)
    weights = {
        "fc1_weight": _he(rng, (128, 64), 64),
        "fc1_bias": _normal(rng, (128,), 0.01),
        "fc2_weight": _he(rng, (128, 10), 128),
        "fc2_bias": _normal(rng, (10,), 0.01),
    }
    text = """
    mlp (float[batch,64] x) => (float[batch,10] y) {
        h = Gemm <transB = 1> (x, fc1_weight, fc1_bias)
        a = Relu (h)
        y = Gemm (a, fc2_weight, fc2_bias)
    }
    """
    feeds = {"x": rng.standard_normal((2, 64), dtype=np.float32)}
    return ZooModel("mlp", _assemble(text, weights), feeds)


def _build_cnn_bn(seed: int) -> ZooModel:
    """Two Conv+BatchNormalization+Relu stages (with and without conv bias) and a classifier."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1_weight": _he(rng, (16, 3, 3, 3), 3 * 9),
        "conv1_bias": _normal(rng, (16,), 0.01),
        **_batch_norm(rng, "bn1", 16),
        "conv2_weight": _he(rng, (32, 16, 3, 3), 16 * 9),
        **_batch_norm(rng, "bn2", 32),
        "fc_weight": _he(rng, (10, 32), 32),
        "fc_bias": _normal(rng, (10,), 0.01),
    }
    text = """
    cnn_bn (float[1,3,32,32] image) => (float[1,10] logits) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (image, conv1_weight, conv1_bias)
        n1 = BatchNormalization <epsilon = 1e-5> (c1, bn1_scale, bn1_bias, bn1_mean, bn1_var)
        r1 = Relu (n1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, conv2_weight)
        n2 = BatchNormalization <epsilon = 1e-5> (c2, bn2_scale, bn2_bias, bn2_mean, bn2_var)
        r2 = Relu (n2)
        pooled = GlobalAveragePool (r2)
        flat = Flatten <axis = 1> (pooled)
        logits = Gemm <transB = 1> (flat, fc_weight, fc_bias)
    }
    """
    feeds = {"image": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)}
    return ZooModel("cnn_bn", _assemble(text, weights), feeds)


def _build_mobilenet(seed: int) -> ZooModel:
    """MobileNet-v1-style blocks: depthwise 3x3 then pointwise 1x1, each Conv-BN-ReLU6, and a classifier.

    No residuals, so every pointwise layer's channels reach the next block
    through a depthwise conv: the pattern channel pruning must keep consistent.
    """
    rng = np.random.default_rng(seed)
    blocks = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
    weights = {"stem_weight": _he(rng, (32, 3, 3, 3), 27), **_batch_norm(rng, "stem_bn", 32)}
    weights["relu6_min"], weights["relu6_max"] = np.array(0.0, np.float32), np.array(6.0, np.float32)
    lines = [
        "s = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (image, stem_weight)",
        "sn = BatchNormalization <epsilon = 1e-5> (s, stem_bn_scale, stem_bn_bias, stem_bn_mean, stem_bn_var)",
        "x0 = Clip (sn, relu6_min, relu6_max)",
    ]
    for i, (cin, cout, stride) in enumerate(blocks, 1):
        weights[f"dw{i}_weight"] = _he(rng, (cin, 1, 3, 3), 9)
        weights.update(_batch_norm(rng, f"dw{i}_bn", cin))
        weights[f"pw{i}_weight"] = _he(rng, (cout, cin, 1, 1), cin)
        weights.update(_batch_norm(rng, f"pw{i}_bn", cout))
        dw_bn, pw_bn = (", ".join(f"{kind}{i}_bn_{p}" for p in ("scale", "bias", "mean", "var")) for kind in ("dw", "pw"))
        lines += [
            f"d{i} = Conv <group = {cin}, kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [{stride}, {stride}]> (x{i - 1}, dw{i}_weight)",
            f"dn{i} = BatchNormalization <epsilon = 1e-5> (d{i}, {dw_bn})",
            f"dr{i} = Clip (dn{i}, relu6_min, relu6_max)",
            f"p{i} = Conv <kernel_shape = [1, 1]> (dr{i}, pw{i}_weight)",
            f"pn{i} = BatchNormalization <epsilon = 1e-5> (p{i}, {pw_bn})",
            f"x{i} = Clip (pn{i}, relu6_min, relu6_max)",
        ]
    weights["fc_weight"], weights["fc_bias"] = _he(rng, (10, 256), 256), _normal(rng, (10,), 0.01)
    lines += [f"pooled = GlobalAveragePool (x{len(blocks)})", "flat = Flatten <axis = 1> (pooled)", "logits = Gemm <transB = 1> (flat, fc_weight, fc_bias)"]
    body = "\n        ".join(lines)
    text = f"""
    mobilenet (float[1,3,112,112] image) => (float[1,10] logits) {{
        {body}
    }}
    """
    feeds = {"image": rng.standard_normal((1, 3, 112, 112), dtype=np.float32)}
    return ZooModel("mobilenet", _assemble(text, weights), feeds)


def _build_residual(seed: int) -> ZooModel:
    """A ResNet basic block: Conv-BN-Relu-Conv-BN, Add with the skip input, Relu."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1_weight": _he(rng, (16, 16, 3, 3), 16 * 9),
        **_batch_norm(rng, "bn1", 16),
        "conv2_weight": _he(rng, (16, 16, 3, 3), 16 * 9),
        **_batch_norm(rng, "bn2", 16),
    }
    text = """
    residual (float[1,16,16,16] x) => (float[1,16,16,16] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, conv1_weight)
        n1 = BatchNormalization <epsilon = 1e-5> (c1, bn1_scale, bn1_bias, bn1_mean, bn1_var)
        r1 = Relu (n1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, conv2_weight)
        n2 = BatchNormalization <epsilon = 1e-5> (c2, bn2_scale, bn2_bias, bn2_mean, bn2_var)
        s = Add (n2, x)
        y = Relu (s)
    }
    """
    feeds = {"x": rng.standard_normal((1, 16, 16, 16), dtype=np.float32)}
    return ZooModel("residual", _assemble(text, weights), feeds)


def _build_attention(seed: int) -> ZooModel:
    """Single-head self-attention with output projection, residual Add and LayerNormalization."""
    rng = np.random.default_rng(seed)
    dim = 32
    # 1/sqrt(dim) (Xavier-like) keeps the projections at the input's scale;
    # there is no ReLU here to halve the variance.
    weights: dict[str, np.ndarray] = {}
    for proj in ("q", "k", "v", "o"):
        weights[f"{proj}_weight"] = _normal(rng, (dim, dim), 1.0 / np.sqrt(dim))
        weights[f"{proj}_bias"] = _normal(rng, (dim,), 0.01)
    weights["scale"] = np.array(np.sqrt(dim), dtype=np.float32)
    weights["ln_weight"] = rng.uniform(0.8, 1.2, dim).astype(np.float32)
    weights["ln_bias"] = _normal(rng, (dim,), 0.05)
    text = """
    attention (float[1,8,32] x) => (float[1,8,32] y) {
        qm = MatMul (x, q_weight)
        q = Add (qm, q_bias)
        km = MatMul (x, k_weight)
        k = Add (km, k_bias)
        vm = MatMul (x, v_weight)
        v = Add (vm, v_bias)
        kt = Transpose <perm = [0, 2, 1]> (k)
        scores = MatMul (q, kt)
        scaled = Div (scores, scale)
        probs = Softmax <axis = -1> (scaled)
        ctx = MatMul (probs, v)
        om = MatMul (ctx, o_weight)
        o = Add (om, o_bias)
        res = Add (x, o)
        y = LayerNormalization <axis = -1, epsilon = 1e-5> (res, ln_weight, ln_bias)
    }
    """
    feeds = {"x": rng.standard_normal((1, 8, dim), dtype=np.float32)}
    return ZooModel("attention", _assemble(text, weights), feeds)


def _build_if_outer_scope(seed: int) -> ZooModel:
    """An If whose input-less branches read the main graph's value ``h`` and initializers ``W1``/``b1``."""
    rng = np.random.default_rng(seed)
    weights = {
        "W0": _normal(rng, (16, 32), 1.0 / np.sqrt(16)),
        "W1": _he(rng, (32, 32), 32),
        "b1": _normal(rng, (32,), 0.05),
    }
    # In the textual syntax `bool cond` is a scalar (shape []); `bool[] cond`
    # would leave the rank unknown.
    text = """
    if_outer_scope (float[1,16] x, bool cond) => (float[1,32] y) {
        h = MatMul (x, W0)
        y = If (cond) <
            then_branch = then_body () => (float[1,32] then_out) {
                hm = MatMul (h, W1)
                then_out = Relu (hm)
            },
            else_branch = else_body () => (float[1,32] else_out) {
                hb = Add (h, b1)
                else_out = Sigmoid (hb)
            }
        >
    }
    """
    feeds = {"x": rng.standard_normal((1, 16), dtype=np.float32), "cond": np.array(True)}
    return ZooModel("if_outer_scope", _assemble(text, weights), feeds)


def _build_constant_weights(seed: int) -> ZooModel:
    """Every weight is a Constant node and there are no initializers, as in Paddle exports."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv_weight": _he(rng, (4, 3, 3, 3), 3 * 9),
        "conv_bias": _normal(rng, (4,), 0.01),
        "conv_bias_shape": np.array([1, 4, 1, 1], dtype=np.int64),
        "fc_weight": _he(rng, (4 * 8 * 8, 10), 4 * 8 * 8),
        "fc_bias": _normal(rng, (10,), 0.01),
    }
    text = """
    constant_weights (float[1,3,8,8] x) => (float[1,10] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, conv_weight)
        bias4d = Reshape (conv_bias, conv_bias_shape)
        cb = Add (c, bias4d)
        r = Relu (cb)
        flat = Flatten <axis = 1> (r)
        m = MatMul (flat, fc_weight)
        y = Add (m, fc_bias)
    }
    """
    feeds = {"x": rng.standard_normal((1, 3, 8, 8), dtype=np.float32)}
    return ZooModel("constant_weights", _assemble(text, weights, as_constants=True), feeds)


def _build_external_data(seed: int) -> ZooModel:
    """A 256-256-256-10 MLP (about 0.5 MB of weights) meant to be stored with external data."""
    rng = np.random.default_rng(seed)
    weights = {
        "fc1_weight": _he(rng, (256, 256), 256),
        "fc1_bias": _normal(rng, (256,), 0.01),
        "fc2_weight": _he(rng, (256, 256), 256),
        "fc2_bias": _normal(rng, (256,), 0.01),
        "fc3_weight": _he(rng, (10, 256), 256),
        "fc3_bias": _normal(rng, (10,), 0.01),
    }
    text = """
    external_data (float[1,256] x) => (float[1,10] y) {
        h1 = Gemm <transB = 1> (x, fc1_weight, fc1_bias)
        a1 = Relu (h1)
        h2 = Gemm <transB = 1> (a1, fc2_weight, fc2_bias)
        a2 = Relu (h2)
        y = Gemm <transB = 1> (a2, fc3_weight, fc3_bias)
    }
    """
    feeds = {"x": rng.standard_normal((1, 256), dtype=np.float32)}
    return ZooModel("external_data", _assemble(text, weights), feeds, external_data=True)


TINY_BUILDERS: dict[str, Callable[[int], ZooModel]] = {
    "mlp": _build_mlp,
    "cnn_bn": _build_cnn_bn,
    "mobilenet": _build_mobilenet,
    "residual": _build_residual,
    "attention": _build_attention,
    "if_outer_scope": _build_if_outer_scope,
    "constant_weights": _build_constant_weights,
    "external_data": _build_external_data,
}
