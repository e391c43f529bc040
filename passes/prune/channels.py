"""Structured channel pruning: remove whole output channels and shrink every tensor that carries them.

A *chain* starts at a Conv (group 1) or Gemm whose output channels can go,
and follows the channels to the layers that consume them:

    producer -> any sequence of
                  channel-wise nodes: BatchNormalization, a depthwise Conv
                    (group = channels, one filter each), Mul/Add/Sub/Div by a
                    per-channel or scalar constant,
                  activations: Relu | Clip | LeakyRelu | Sigmoid | Tanh,
                  pools: MaxPool | AveragePool | GlobalAveragePool,
                  Flatten after a global pool
             -> consumers (Conv group 1, or Gemm reading the channels as features)

Along it, the producer's weight rows and bias, every channel-wise node's
per-channel parameters (a depthwise conv's filters, bias and group count
included) and the consumers' input channels are cut to the kept channels,
so tensors physically shrink and the graph's outputs keep their shapes.
Channel-wise nodes never mix channels, which is what lets the kept channels
keep their meaning through them. Anything else on the way (a residual Add, a
Concat, a grouped conv, a Reshape, a graph output) leaves the chain alone,
and the reason is reported.

Importance is the L1 norm of each output channel's weights (L2 with
``norm=l2``), or, from calibration data (``norm=activation``), how much each
channel feeds forward: its mean absolute activation where the consumers read
it times the L2 norm of the consumer weights that read it. Weight norms
ignore what BatchNorm, activations and the inputs do to a channel; a channel
with large filters that ReLU keeps at zero costs nothing to remove.
"""

from __future__ import annotations

__all__ = ["Chain", "activation_importance", "channel_mean_abs", "find_chains", "importance", "prune_chain"]

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

_ONNX_DOMAINS = ("", "ai.onnx")
_UNARY = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
_ARITHMETIC = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclass
class Chain:
    """A producer, the channel-carrying nodes after it, and the consumers whose inputs shrink."""

    producer: ir.Node
    # Each channel-wise node with the (input index, axis) of its per-channel constants.
    channelwise: list[tuple[ir.Node, list[tuple[int, int]]]] = field(default_factory=list)
    passthrough: list[ir.Node] = field(default_factory=list)
    consumers: list[ir.Node] = field(default_factory=list)
    output: ir.Value | None = None  # the tensor the consumers read


def find_chains(graph: ir.Graph, candidates: list[ir.Node]) -> tuple[list[Chain], dict[str, str]]:
    """Chains for the given producers, and ``{node: reason}`` for those that cannot be pruned."""
    chains, refused = [], {}
    for node in candidates:
        chain_or_reason = _follow(node)
        if isinstance(chain_or_reason, Chain):
            chains.append(chain_or_reason)
        else:
            refused[node.name or node.op_type] = chain_or_reason
    return chains, refused


def _follow(producer: ir.Node) -> Chain | str:
    if producer.op_type == "Conv" and producer.attributes.get_int("group", 1) != 1:
        return "grouped or depthwise conv"
    if producer.op_type == "Gemm" and producer.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if not _const(producer.inputs[1] if len(producer.inputs) > 1 else None):
        return "weight is not an initializer"
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    channels = producer.inputs[1].const_value.shape[output_axis(producer)]  # type: ignore[union-attr]
    if bias is not None and not (_const(bias) and bias.const_value.shape.dims in ((channels,), (1,), ())):  # type: ignore[union-attr]
        return "bias is not a constant vector per channel"
    chain = Chain(producer)
    value, flattened, pooled_globally = producer.outputs[0], False, False
    if producer.op_type == "Gemm":
        flattened = True  # its channels are features on axis 1 of a 2-D tensor
    while True:
        if value.is_graph_output():
            return "channels reach a graph output"
        users = [user for user, _ in value.uses()]
        if len(users) != 1:
            return _consumers(chain, value, users, flattened)
        (user,) = users
        if user.domain not in _ONNX_DOMAINS:
            return f"channels reach custom op {user.domain}.{user.op_type}"
        cuts = _channelwise_cuts(user, value, flattened)
        if isinstance(cuts, str):
            return cuts
        if cuts is not None:
            chain.channelwise.append((user, cuts))
        elif user.op_type in _UNARY and user.inputs[0] is value and all(_const(v) for v in user.inputs[1:] if v is not None):
            chain.passthrough.append(user)
        elif user.op_type in _POOLS and not flattened:
            chain.passthrough.append(user)
            pooled_globally = pooled_globally or user.op_type == "GlobalAveragePool"
        elif user.op_type == "Flatten" and pooled_globally and not flattened and user.attributes.get_int("axis", 1) == 1:
            chain.passthrough.append(user)
            flattened = True
        else:
            return _consumers(chain, value, users, flattened)
        value = user.outputs[0]


def _channelwise_cuts(user: ir.Node, value: ir.Value, flattened: bool) -> list[tuple[int, int]] | str | None:
    """(input index, axis) of the per-channel constants ``user`` needs cut; None if it is not channel-wise, a reason if it cannot be cut."""
    label = f"{user.op_type} {user.name or ''}".rstrip()
    if user.op_type == "BatchNormalization" and user.inputs[0] is value and not flattened:
        cuts = [(index, 0) for index in range(1, 5)]
    elif user.op_type == "Conv" and user.inputs[0] is value and not flattened:
        weight = user.inputs[1]
        group = user.attributes.get_int("group", 1)
        if group == 1:
            return None  # a consumer
        if not _const(weight) or weight.const_value.shape[0] != group or weight.const_value.shape[1] != 1:  # type: ignore[union-attr]
            return f"channels reach grouped conv {label} (only depthwise convs with one filter per channel are followed)"
        cuts = [(1, 0)] + ([(2, 0)] if len(user.inputs) > 2 and user.inputs[2] is not None else [])
    elif user.op_type in _ARITHMETIC and len(user.inputs) == 2 and user.inputs[0] is value and user.inputs[1] is not value:
        constant = user.inputs[1]
        if not _const(constant):
            return None  # a residual-style join: the consumer check names it
        dims = constant.const_value.shape.numpy()  # type: ignore[union-attr]
        if math.prod(dims) == 1:
            cuts = []
        else:
            channel_axis = len(dims) - (1 if flattened else 3)  # NCHW channels, or the feature axis after Flatten
            if channel_axis < 0 or any(d != 1 for i, d in enumerate(dims) if i != channel_axis):
                return f"channels reach {label} with a constant that is not per channel"
            cuts = [(1, channel_axis)]
    else:
        return None
    for index, _ in cuts:
        param = user.inputs[index]
        if not _const(param) or any(other is not user for other, _ in param.uses()):  # type: ignore[union-attr]
            return f"{label} has a shared or non-constant parameter"
    return cuts


def _consumers(chain: Chain, value: ir.Value, users: list[ir.Node], flattened: bool) -> Chain | str:
    for user in users:
        label = f"{user.op_type} {user.name or ''}".rstrip()
        conv_ok = user.op_type == "Conv" and not flattened and user.attributes.get_int("group", 1) == 1
        gemm_ok = user.op_type == "Gemm" and (flattened or chain.producer.op_type == "Gemm") and not user.attributes.get_int("transA", 0)
        if not (conv_ok or gemm_ok):
            return f"channels reach {label}"
        if list(user.inputs).count(value) != 1 or user.inputs[0] is not value:
            return f"channels reach a weight or bias input of {label}"
        weight = user.inputs[1] if len(user.inputs) > 1 else None
        if not _const(weight) or any(other is not user for other, _ in weight.uses()):  # type: ignore[union-attr]
            return f"{label} has no private constant weight"
    if not users:
        return "channels are not used"
    chain.consumers, chain.output = users, value
    return chain


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def output_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s output channels."""
    return 1 if node.op_type == "Gemm" and not node.attributes.get_int("transB", 0) else 0


def input_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s input channels."""
    if node.op_type == "Conv":
        return 1
    return 1 if node.attributes.get_int("transB", 0) else 0


def importance(chain: Chain, norm: str) -> np.ndarray:
    """One score per output channel of the producer: the L1 (or L2) norm of its weights."""
    weight = chain.producer.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), output_axis(chain.producer), 0).reshape(weight.shape[output_axis(chain.producer)], -1)
    return np.sqrt((moved**2).sum(axis=1)) if norm == "l2" else moved.sum(axis=1)


def channel_mean_abs(array: np.ndarray) -> np.ndarray:
    """Mean absolute value of each channel (axis 1) of one activation tensor."""
    return np.abs(np.asarray(array, np.float64)).mean(axis=tuple(axis for axis in range(array.ndim) if axis != 1))


def activation_importance(chain: Chain, mean_abs: np.ndarray) -> np.ndarray:
    """One score per channel: ``mean_abs`` (of the consumers' input) times the L2 norm of the consumer weights reading it."""
    reach = np.zeros_like(mean_abs)
    for user in chain.consumers:
        weight = user.inputs[1].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        moved = np.moveaxis(weight, input_axis(user), 0).reshape(weight.shape[input_axis(user)], -1)
        reach += (moved**2).sum(axis=1)
    return mean_abs * np.sqrt(reach)


def prune_chain(chain: Chain, keep: np.ndarray) -> None:
    """Cuts every tensor of the chain to the channels in ``keep`` (sorted indices)."""
    producer = chain.producer
    _take(producer.inputs[1], keep, output_axis(producer))
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    if bias is not None and bias.const_value is not None and bias.const_value.size > 1:  # a broadcast scalar stays
        _take(bias, keep, 0)
    for node, cuts in chain.channelwise:
        for index, axis in cuts:
            constant = node.inputs[index]
            if constant is not None and constant.const_value is not None and constant.const_value.shape[axis] > 1:
                _take(constant, keep, axis)
        if node.op_type == "Conv":  # depthwise: one group per kept channel
            node.attributes["group"] = ir.AttrInt64("group", len(keep))
    for user in chain.consumers:
        _take(user.inputs[1], keep, input_axis(user))
    # Shapes recorded on the chain's tensors no longer hold; onnxruntime infers them.
    for node in [producer, *(node for node, _ in chain.channelwise), *chain.passthrough]:
        for output in node.outputs:
            output.shape = None


def _take(value: ir.Value | None, keep: np.ndarray, axis: int) -> None:
    assert value is not None and value.const_value is not None
    array = np.take(value.const_value.numpy(), keep, axis=axis)
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
