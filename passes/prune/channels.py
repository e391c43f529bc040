"""Structured channel pruning: remove whole output channels and shrink every tensor that carries them.

A *chain* starts at a Conv (grouped or not; a depthwise conv's channels are
cut with the layer before it), a ConvTranspose (group 1), a Gemm, or a
MatMul by a constant 2-D weight, whose output channels can go, and follows
the channels to the layers that consume them:

    producer -> any sequence of
                  channel-wise nodes: BatchNormalization, a depthwise Conv
                    (group = channels, one filter each), Mul/Add/Sub/Div by a
                    per-channel or scalar constant (on either side), PRelu,
                  elementwise activations (Relu, Sigmoid, Erf, Gelu, ...),
                  an elementwise region: several elementwise nodes that read
                    the channels and join again into one tensor, such as
                    Gelu spelled with Erf, x * 0.5 * (1 + Erf(x / sqrt 2)), or
                    SiLU, x * Sigmoid(x),
                  pools: MaxPool | AveragePool | GlobalAveragePool,
                  Flatten, or Reshape to [batch, -1] (after a global pool, or of
                    a whole feature map: then each channel is a block of H*W
                    features),
                  one Concat along the channel axis (the channels become a
                    segment of its output, at an offset)
             -> consumers (a Conv, grouped or not, or a Gemm or MatMul reading the channels as features)

A grouped conv, as producer or consumer, is kept consistent: every group
loses the same number of channels (its own least important ones), so the
group count stays and each group's filters read or write fewer channels.

A MatMul's channels are the last axis of its output (``[..., N]`` for a
``[K, N]`` weight), as in a transformer's feed-forward block: MatMul -> Add
bias -> Gelu -> MatMul. After a Gemm, a MatMul, Flatten or Reshape the
channels are features on the last axis; before, they are axis 1 (NCHW).

Along it, the producer's weight rows and bias, every channel-wise node's
per-channel parameters (a depthwise conv's filters, bias and group count
included) and the consumers' input channels are cut to the kept channels,
so tensors physically shrink and the graph's outputs keep their shapes.
Channel-wise nodes never mix channels, which is what lets the kept channels
keep their meaning through them. Through a Concat, the consumers' input
channels are cut once for all its segments (``prune_concat_consumers``),
since several chains may feed one Concat. Anything else on the way (a
residual Add, a Reshape, a graph output) leaves the chain alone, and the
reason is reported.

Which channels go is importance.py's choice.
"""

from __future__ import annotations

__all__ = [
    "Chain",
    "bias_value",
    "blocks",
    "find_chains",
    "grouped_keep",
    "input_axis",
    "output_axis",
    "prune_chain",
    "prune_concat_consumers",
    "vector_bias",
]

import math
from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes.prune.layer_checks import layer_label

_ONNX_DOMAINS = ("", "ai.onnx")
# Elementwise ops whose only tensor input is the channels (Clip's bounds are constants).
_UNARY = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
     "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Neg", "Abs", "Identity", "Exp", "Sqrt", "Dropout"}
)
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
_ARITHMETIC = frozenset({"Mul", "Add", "Sub", "Div"})
_REGION_LIMIT = 64  # nodes an elementwise region may hold; real ones (Gelu, SiLU, HardSwish) have a handful


@dataclass
class Chain:
    """A producer, the channel-carrying nodes after it, and the consumers whose inputs shrink."""

    producer: ir.Node
    # Each channel-wise node with the (input index, axis) of its per-channel constants.
    channelwise: list[tuple[ir.Node, list[tuple[int, int]]]] = field(default_factory=list)
    passthrough: list[ir.Node] = field(default_factory=list)
    consumers: list[ir.Node] = field(default_factory=list)
    output: ir.Value | None = None  # the tensor the consumers read
    axis: int = 1  # channel axis of the tensors along the chain: 1 (NCHW or 2-D features), or -1 after a MatMul
    groups: int = 1  # contiguous channel groups that must each lose as many channels (a grouped conv producer or consumer)
    block: int = 1  # consumer input features per channel (H*W after Flatten of a feature map)
    concat: tuple[ir.Node, int] | None = None  # the Concat the channels join, and at which input
    segments: list[int] = field(default_factory=list)  # channel counts of that Concat's inputs

    @property
    def channels(self) -> int:
        """The producer's output channels."""
        return self.producer.inputs[1].const_value.shape[output_axis(self.producer)]  # type: ignore[union-attr]

    @property
    def offset(self) -> int:
        """Where the producer's channels start among the consumers' input channels (its Concat segment)."""
        return sum(self.segments[: self.concat[1]]) if self.concat else 0


def find_chains(graph: ir.Graph, candidates: list[ir.Node]) -> tuple[list[Chain], dict[str, str]]:
    """Chains for the given producers, and ``{node: reason}`` for those that cannot be pruned."""
    chains, refused = [], {}
    for node in candidates:
        chain_or_reason = _follow(node)
        if isinstance(chain_or_reason, Chain):
            chains.append(chain_or_reason)
        else:
            refused[layer_label(node)] = chain_or_reason
    return chains, refused


def _follow(producer: ir.Node) -> Chain | str:
    refusal = _producer_refusal(producer)
    if refusal:
        return refusal
    chain = Chain(producer, axis=-1 if producer.op_type == "MatMul" else 1, groups=producer.attributes.get_int("group", 1))
    value, flattened, pooled_globally, spatial = producer.outputs[0], False, False, False
    if producer.op_type in ("Gemm", "MatMul"):
        flattened = True  # its channels are features on the last axis
    while True:
        if value.is_graph_output():
            return "channels reach a graph output"
        users = [user for user, _ in value.uses()]
        if len(users) != 1:
            found = _consumers(chain, value, users, flattened, spatial)
            region = None if isinstance(found, Chain) else _elementwise_region(value, flattened)
            if region is None:
                return found
            nodes, value = region
            if chain.concat is not None and any(cuts for _, cuts in nodes):
                return "per-channel constants after a Concat"
            chain.channelwise.extend(nodes)
            continue
        (user,) = users
        if user.domain not in _ONNX_DOMAINS:
            return f"channels reach custom op {user.domain}.{user.op_type}"
        cuts = _channelwise_cuts(user, value, flattened)
        if isinstance(cuts, str):
            return cuts
        if cuts and chain.concat is not None:
            return f"per-channel constants of {user.op_type} after a Concat"
        if cuts is not None:
            chain.channelwise.append((user, cuts))
        elif _is_unary(user, (value,)):
            chain.passthrough.append(user)
        elif user.op_type in _POOLS and not flattened:
            chain.passthrough.append(user)
            pooled_globally = pooled_globally or user.op_type == "GlobalAveragePool"
        elif not flattened and (
            (user.op_type == "Flatten" and user.attributes.get_int("axis", 1) == 1) or (user.op_type == "Reshape" and _flattens_to_rows(user))
        ):
            chain.passthrough.append(user)
            flattened, spatial = True, not pooled_globally
        elif user.op_type == "Concat" and chain.concat is None and not flattened and user.attributes.get_int("axis", 0) == 1:
            if list(user.inputs).count(value) != 1:
                return "channels reach a Concat twice"
            segments = [_channel_count(v) for v in user.inputs]
            if any(count is None for count in segments):
                return "channel counts of the Concat inputs are unknown"
            chain.concat, chain.segments = (user, list(user.inputs).index(value)), segments  # type: ignore[assignment]
            chain.passthrough.append(user)
        else:
            return _consumers(chain, value, users, flattened, spatial)
        value = user.outputs[0]


def _producer_refusal(producer: ir.Node) -> str:
    """Why ``producer``'s output channels cannot start a chain; "" when they can."""
    group = producer.attributes.get_int("group", 1)
    weight = producer.inputs[1] if len(producer.inputs) > 1 else None
    if _is_depthwise(producer):
        return "depthwise conv (its channels are cut with the layer before it)"
    if producer.op_type == "ConvTranspose" and group != 1:
        return "grouped ConvTranspose"
    if producer.op_type == "Gemm" and producer.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if not _const(weight):
        return "weight is not an initializer"
    if producer.op_type == "MatMul" and (len(weight.const_value.shape) != 2 or _const(producer.inputs[0])):  # type: ignore[union-attr]
        return "MatMul weight is not a 2-D constant on the right"
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    channels = weight.const_value.shape[output_axis(producer)]  # type: ignore[union-attr]
    if bias is not None and not (_const(bias) and bias.const_value.shape.dims in ((channels,), (1,), ())):  # type: ignore[union-attr]
        return "bias is not a constant vector per channel"
    return ""


def _is_depthwise(node: ir.Node) -> bool:
    """A Conv with one constant filter per channel (group = channels): channel-wise, it never mixes channels."""
    group = node.attributes.get_int("group", 1)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type != "Conv" or group == 1 or not _const(weight):
        return False
    return weight.const_value.shape[0] == group and weight.const_value.shape[1] == 1  # type: ignore[union-attr]


def _is_unary(node: ir.Node, carried: Container[ir.Value]) -> bool:
    """Whether ``node`` is an elementwise op on a ``carried`` tensor alone (other inputs constant)."""
    if node.op_type not in _UNARY or node.inputs[0] not in carried or not all(_const(v) for v in node.inputs[1:] if v is not None):
        return False
    return node.op_type != "Dropout" or _is_identity_dropout(node)


def _is_identity_dropout(node: ir.Node) -> bool:
    """A Dropout that passes its input through: not in training mode, and no one reads its mask (which would keep every channel)."""
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.is_graph_output() or any(True for _ in mask.uses())):
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    return training is None or not bool(np.any(training.const_value.numpy()))  # type: ignore[union-attr]


def _channelwise_cuts(user: ir.Node, value: ir.Value, flattened: bool) -> list[tuple[int, int]] | str | None:
    """(input index, axis) of the per-channel constants ``user`` needs cut; None if it is not channel-wise, a reason if it cannot be cut."""
    label = f"{user.op_type} {user.name or ''}".rstrip()
    if user.op_type == "BatchNormalization" and user.inputs[0] is value and not flattened:
        cuts = [(index, 0) for index in range(1, 5)]
    elif _is_depthwise(user) and user.inputs[0] is value and not flattened:  # other Convs are consumers
        cuts = [(1, 0)] + ([(2, 0)] if len(user.inputs) > 2 and user.inputs[2] is not None else [])
    elif _binary_with_constant(user, value):
        index = 1 - list(user.inputs).index(value)  # the constant's side: a bias is often first (Add(b, x@W) in torch exports)
        if not _const(user.inputs[index]):
            return None  # a residual-style join: the consumer check names it
        axis = _per_channel_axis(user.inputs[index], flattened)  # type: ignore[arg-type]
        if isinstance(axis, str):
            return f"channels reach {label} with {axis}"
        cuts = [] if axis is None else [(index, axis)]
    else:
        return None
    for index, _ in cuts:
        param = user.inputs[index]
        if not _const(param) or any(other is not user for other, _ in param.uses()):  # type: ignore[union-attr]
            return f"{label} has a shared or non-constant parameter"
    return cuts


def _binary_with_constant(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` is Mul/Add/Sub/Div with ``value`` on one side (PRelu: on the left) and something else on the other."""
    if node.op_type == "PRelu":
        return len(node.inputs) == 2 and node.inputs[0] is value and node.inputs[1] is not value
    return node.op_type in _ARITHMETIC and len(node.inputs) == 2 and list(node.inputs).count(value) == 1


def _per_channel_axis(constant: ir.Value, flattened: bool) -> int | None | str:
    """The axis of ``constant`` that runs over channels; None for a scalar, a reason if it is not per channel."""
    dims = constant.const_value.shape.numpy()  # type: ignore[union-attr]
    if math.prod(dims) == 1:
        return None
    channel_axis = len(dims) - (1 if flattened else 3)  # NCHW channels, or the feature axis after Flatten / a MatMul
    if channel_axis < 0 or any(d != 1 for i, d in enumerate(dims) if i != channel_axis):
        return "a constant that is not per channel"
    return channel_axis


def _elementwise_region(start: ir.Value, flattened: bool) -> tuple[list[tuple[ir.Node, list[tuple[int, int]]]], ir.Value] | None:
    """The elementwise nodes that read ``start`` and join into one tensor, with their cuts, and that tensor; None if there is none.

    A node joins when every input is a tensor of the region or a scalar or
    per-channel constant it alone reads; it then keeps the channels' meaning.
    The region must end in exactly one tensor that leaves it: every other
    tensor of it is read only inside it (Gelu's and SiLU's forms qualify).
    """
    carried: set[ir.Value] = {start}
    region: list[tuple[ir.Node, list[tuple[int, int]]]] = []
    members: set[ir.Node] = set()
    candidates = dict.fromkeys(user for user, _ in start.uses())
    grew = True
    while grew and len(region) <= _REGION_LIMIT:
        grew = False
        for node in list(candidates):
            cuts = _region_cuts(node, carried, flattened)
            if cuts is None:
                continue
            del candidates[node]
            region.append((node, cuts))
            members.add(node)
            carried.update(node.outputs)
            candidates.update(dict.fromkeys(user for output in node.outputs for user, _ in output.uses() if user not in members))
            grew = True
    if not region or len(region) > _REGION_LIMIT:
        return None
    leaving = [value for value in carried if value.is_graph_output() or any(user not in members for user, _ in value.uses())]
    if len(leaving) != 1 or leaving[0] is start:
        return None
    return region, leaving[0]


def _region_cuts(node: ir.Node, carried: set[ir.Value], flattened: bool) -> list[tuple[int, int]] | None:
    """The cuts ``node`` needs as part of an elementwise region over ``carried``; None if it cannot join."""
    if node.domain not in _ONNX_DOMAINS or len(node.outputs) != 1:
        return None
    if node.op_type in _UNARY:
        return [] if _is_unary(node, carried) else None
    if node.op_type not in _ARITHMETIC or len(node.inputs) != 2:
        return None
    inside = [value in carried for value in node.inputs]
    if all(inside):
        return []
    if not any(inside):
        return None
    cuts = _channelwise_cuts(node, node.inputs[inside.index(True)], flattened)  # type: ignore[arg-type]
    return cuts if isinstance(cuts, list) else None


def _flattens_to_rows(reshape: ir.Node) -> bool:
    """Whether a Reshape's constant shape is ``[batch or 0, -1]``: a Flatten at axis 1 that survives a channel cut."""
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    if not _const(shape) or reshape.inputs[0] is None:
        return False
    dims = shape.const_value.numpy().tolist()  # type: ignore[union-attr]
    return len(dims) == 2 and dims[1] == -1 and dims[0] >= 0


def _channel_count(value: ir.Value | None) -> int | None:
    """Channels (axis 1) of ``value``: from its shape, or from the weights of the layer that made them."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) >= 2 and isinstance(value.shape[1], int):
        return value.shape[1]
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Conv", "Gemm") and _const(node.inputs[1] if len(node.inputs) > 1 else None):
        return node.inputs[1].const_value.shape[output_axis(node)]  # type: ignore[union-attr]
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) == 1:
        counts = [_channel_count(v) for v in node.inputs]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]
    if node.op_type in _UNARY | _POOLS - {"GlobalAveragePool"} | {"BatchNormalization"} | _ARITHMETIC:
        return _channel_count(node.inputs[0])
    return None


def _consumers(chain: Chain, value: ir.Value, users: list[ir.Node], flattened: bool, spatial: bool) -> Chain | str:
    """``chain`` completed with ``users`` as its consumers, or why they cannot all be (``chain`` is then unchanged)."""
    channels = sum(chain.segments) if chain.concat else chain.channels
    block, groups = chain.block, chain.groups
    for user in users:
        label = f"{user.op_type} {user.name or ''}".rstrip()
        conv_ok = user.op_type == "Conv" and not flattened
        gemm_ok = user.op_type == "Gemm" and flattened and not user.attributes.get_int("transA", 0)
        matmul_ok = user.op_type == "MatMul" and flattened
        if not (conv_ok or gemm_ok or matmul_ok):
            return f"channels reach {label}"
        if list(user.inputs).count(value) != 1 or user.inputs[0] is not value:
            return f"channels reach a weight or bias input of {label}"
        weight = user.inputs[1] if len(user.inputs) > 1 else None
        if not _const(weight) or any(other is not user for other, _ in weight.uses()):  # type: ignore[union-attr]
            return f"{label} has no private constant weight"
        if matmul_ok and len(weight.const_value.shape) != 2:  # type: ignore[union-attr]
            return f"{label} has a weight that is not 2-D"
        user_groups = user.attributes.get_int("group", 1) if conv_ok else 1
        if user_groups != 1:
            if chain.concat is not None:
                return f"channels reach grouped conv {label} after a Concat"
            if groups not in (1, user_groups):
                return f"channels reach grouped conv {label}, grouped differently from the layers around it"
            groups = user_groups
        features = weight.const_value.shape[input_axis(user)] * user_groups  # type: ignore[union-attr]
        user_block = features // channels if spatial else 1
        if features != channels * user_block or (block != 1 and user_block != block):
            return f"{label} reads {features} features, not a block per channel of {channels}"
        block = user_block
    if not users:
        return "channels are not used"
    chain.consumers, chain.output, chain.block, chain.groups = users, value, block, groups
    return chain


def bias_value(node: ir.Node) -> ir.Value | None:
    """The value holding ``node``'s bias: a Conv's or Gemm's third input; for a MatMul, the private constant of the Add that alone reads its output.

    Exports write a linear layer as MatMul then Add(b, .) or Add(., b);
    refitting that bias with the weight lets the fit absorb the mean shift
    that removed channels leave behind.
    """
    if node.op_type != "MatMul":
        return node.inputs[2] if len(node.inputs) > 2 else None
    output = node.outputs[0]
    users = list(output.uses())
    if len(users) != 1 or output.is_graph_output():
        return None
    add = users[0][0]
    if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or len(add.inputs) != 2 or list(add.inputs).count(output) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    if other is None or other.const_value is None or other.is_graph_input() or len(other.const_value.shape) != 1:
        return None
    return other if all(user is add for user, _ in other.uses()) else None


def vector_bias(node: ir.Node) -> ir.Value | None:
    """``node``'s bias (see :func:`bias_value`) when it is a constant [N] vector, N its outputs, that only it reads; else None.

    Such a bias can be rewritten for this layer alone: by a refit, or by the
    mean shift of removed input channels.
    """
    value = bias_value(node)
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if value is None or weight is None or not _const(value) or len({user for user, _ in value.uses()}) != 1:
        return None
    return value if tuple(value.const_value.shape.numpy()) == (weight.shape[output_axis(node)],) else None  # type: ignore[union-attr]


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def output_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s output channels: Conv [out, in, ...], ConvTranspose [in, out, ...], MatMul [K, N], Gemm by transB."""
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1 if node.op_type in ("ConvTranspose", "MatMul") else 0


def input_axis(node: ir.Node) -> int:
    """The weight axis of ``node``'s input channels (a consumer: Conv, Gemm or MatMul)."""
    if node.op_type == "Conv":
        return 1
    return 1 if node.attributes.get_int("transB", 0) else 0


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
    if chain.concat is None:
        for user in chain.consumers:
            groups = user.attributes.get_int("group", 1) if user.op_type == "Conv" else 1
            if groups == 1:
                _take(user.inputs[1], blocks(keep, chain.block), input_axis(user))
            else:
                _take_by_group(user.inputs[1], keep, groups)
    # Shapes recorded on the chain's tensors no longer hold; onnxruntime infers them.
    for node in [producer, *(node for node, _ in chain.channelwise), *chain.passthrough]:
        for output in node.outputs:
            output.shape = None


def prune_concat_consumers(chains: list[tuple[Chain, np.ndarray]]) -> None:
    """Cuts the consumers after each Concat to the kept channels of all its segments at once.

    ``chains`` are the pruned chains that pass a Concat, with their kept
    channels; segments no chain pruned stay whole.
    """
    by_concat: dict[ir.Node, dict[int, tuple[Chain, np.ndarray]]] = {}
    for chain, keep in chains:
        assert chain.concat is not None
        by_concat.setdefault(chain.concat[0], {})[chain.concat[1]] = (chain, keep)
    for segments in by_concat.values():
        first = next(iter(segments.values()))[0]
        offsets = np.cumsum([0, *first.segments[:-1]])
        index = np.concatenate(
            [(segments[i][1] if i in segments else np.arange(count)) + offset for i, (count, offset) in enumerate(zip(first.segments, offsets))]
        )
        for user in first.consumers:
            _take(user.inputs[1], blocks(index, first.block), input_axis(user))


def blocks(channels: np.ndarray, block: int) -> np.ndarray:
    """Input feature indices of the given channels when each channel is ``block`` consecutive features."""
    return (np.asarray(channels)[:, None] * block + np.arange(block)[None, :]).ravel()


def grouped_keep(scores: np.ndarray, kept: int, groups: int) -> np.ndarray:
    """The ``kept`` best channels by ``scores`` (sorted indices), as many from each of ``groups`` contiguous groups."""
    if groups == 1:
        return np.sort(np.argsort(-scores, kind="stable")[:kept])
    size = len(scores) // groups
    per_group = max(1, int(round(kept / groups)))
    chosen = [start + np.argsort(-scores[start : start + size], kind="stable")[:per_group] for start in range(0, len(scores), size)]
    return np.sort(np.concatenate(chosen))


def _take_by_group(weight: ir.Value | None, keep: np.ndarray, groups: int) -> None:
    """Cuts a grouped conv's weight [out, in/groups, ...] to the kept input channels, each group's filters to its own."""
    assert weight is not None and weight.const_value is not None
    array = weight.const_value.numpy()
    per_in, per_out = array.shape[1], array.shape[0] // groups
    parts = [array[g * per_out : (g + 1) * per_out][:, keep[(keep >= g * per_in) & (keep < (g + 1) * per_in)] - g * per_in] for g in range(groups)]
    cut = np.ascontiguousarray(np.concatenate(parts, axis=0))
    weight.const_value = ir.Tensor(cut, name=weight.name)
    weight.shape = ir.Shape(cut.shape)


def _take(value: ir.Value | None, keep: np.ndarray, axis: int) -> None:
    assert value is not None and value.const_value is not None
    array = np.take(value.const_value.numpy(), keep, axis=axis)
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
