"""Layer steps for the strategies: MatMul, Gemm, Conv and BatchNormalization, and what follows a layer.

Each step takes the builder and a source value and adds nodes; the layer's
optional follower (a BatchNorm or per-channel Add/Mul/Sub/Div) is what the
fold passes absorb into weights.
"""

from __future__ import annotations

__all__ = ["batchnorm", "conv", "gemm", "matmul"]

import math

import numpy as np
from hypothesis import strategies as st
from properties.builder import GraphBuilder, elementwise_constant


def _follow(g: GraphBuilder, y: str, channel_axis: int) -> None:
    """Optionally a BatchNorm or per-channel elementwise ops after a layer output ``y`` (what fold absorbs)."""
    for _ in range(g.choice((1, 2))):
        shape = g.values[y]
        then = g.choice(("none", "batchnorm", "elementwise", "elementwise"))
        if then == "batchnorm" and channel_axis % len(shape) == 1:
            y = batchnorm(g, y)
        elif then == "elementwise":
            axis = channel_axis % len(shape)
            const_shape = g.choice(((shape[axis],) + (1,) * (len(shape) - 1 - axis), (), (1,)))
            if const_shape and g.draw(st.booleans()):
                const_shape = (1,) * (len(shape) - len(const_shape)) + const_shape
            y = elementwise_constant(g, y, g.choice(("Mul", "Add", "Sub", "Div")), const_shape)


def matmul(g: GraphBuilder, x: str) -> None:
    shape = g.values[x]
    k = shape[-1]
    n = k if g.preserve else g.choice((k, *g.widths))
    (y,) = g.node("MatMul", [x, g.weight((k, n), 1 / math.sqrt(k))], [shape[:-1] + (n,)])
    if g.draw(st.booleans()):  # a bias, as exporters write Linear layers
        y = elementwise_constant(g, y, "Add", g.choice(((n,), (1, n))))
    _follow(g, y, -1)


def gemm(g: GraphBuilder, x: str) -> None:
    a, b = g.values[x]
    trans_a = 0 if g.preserve else g.choice((0, 1))
    m, k = (b, a) if trans_a else (a, b)
    n = k if g.preserve else g.choice((k, *g.widths))
    trans_b = g.choice((0, 1))
    inputs = [x, g.weight((n, k) if trans_b else (k, n), 1 / math.sqrt(k))]
    bias = g.choice(("none", (n,), (1, n), (m, n), (m, 1), (1,), ()))
    if bias != "none":
        inputs.append(g.constant((g.rng.standard_normal(bias) * 0.1).astype(np.float32), "bias"))
    attrs = {"transA": trans_a, "transB": trans_b}
    for key in ("alpha", "beta"):
        if g.draw(st.booleans()):
            attrs[key] = float(np.float32(g.rng.uniform(0.5, 2.0)))
    (y,) = g.node("Gemm", inputs, [(m, n)], **attrs)
    _follow(g, y, 1)


def conv(g: GraphBuilder, x: str) -> None:
    n, c, h, w = g.values[x]
    group = g.choice(sorted({1, c, *(d for d in range(2, c) if c % d == 0)}))
    if g.preserve:
        out_channels, kernel, stride = c, g.choice((1, 3)), 1
        pad = kernel // 2
    else:
        out_channels = g.choice(sorted({group * m for m in (1, 2)} | {width for width in g.widths if width % group == 0}))
        kernel, pad, stride = g.choice((1, 3)), g.choice((0, 1)), g.choice((1, 2))
        if min(h, w) + 2 * pad < kernel:
            pad = 1
    fan_in = c // group * kernel * kernel
    inputs = [x, g.weight((out_channels, c // group, kernel, kernel), 1 / math.sqrt(fan_in))]
    if g.draw(st.booleans()):
        inputs.append(g.constant((g.rng.standard_normal(out_channels) * 0.1).astype(np.float32), "bias"))
    size = [(d + 2 * pad - kernel) // stride + 1 for d in (h, w)]
    attrs = {"group": group, "pads": [pad] * 4, "strides": [stride] * 2}
    if g.draw(st.booleans()):
        attrs["kernel_shape"] = [kernel, kernel]
    (y,) = g.node("Conv", inputs, [(n, out_channels, *size)], **attrs)
    _follow(g, y, 1)


def batchnorm(g: GraphBuilder, x: str) -> str:
    c = g.values[x][1]
    params = [
        g.vector(c, 0.5, 1.5, signed=True),  # scale
        (g.rng.standard_normal(c) * 0.1).astype(np.float32),  # B
        (g.rng.standard_normal(c) * 0.1).astype(np.float32),  # mean
        g.vector(c, 0.5, 1.5),  # var
    ]
    names = [g.constant(p, role) for p, role in zip(params, ("bnscale", "bnbias", "bnmean", "bnvar"))]
    return g.node("BatchNormalization", [x, *names], [g.values[x]], epsilon=g.choice((1e-5, 1e-3)))[0]
