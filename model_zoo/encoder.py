"""A BERT/MiniLM-style transformer encoder with seeded random weights, built without downloads.

The graph is what a PyTorch export of ``BertModel`` (post-LayerNorm, no
pooler) looks like at opset 17, ir_version 8, float32::

    input_ids [batch, sequence] --Gather(word table)--+
    Shape -> Gather(1) -> Range -> Gather(position table) --Add--> Add(token-type row)
                                                        -> LayerNormalization -> h
    attention_mask -> Unsqueeze -> Cast -> (1 - m) * -10000 -> extended mask

    per layer:
        q, k, v = MatMul+Add -> Reshape [0, 0, heads, head_dim] -> Transpose
        probs = Softmax(q @ k^T / sqrt(head_dim) + extended mask)
        ctx = Transpose(probs @ v) -> Reshape [0, 0, hidden] -> MatMul+Add
        h = LayerNormalization(h + ctx)
        f = MatMul+Add -> Gelu as x * 0.5 * (1 + Erf(x / sqrt(2))) -> MatMul+Add
        h = LayerNormalization(h + f)

    last_hidden_state = h   [batch, sequence, hidden]

Both inputs are int64 with the symbolic dims ``batch`` and ``sequence``, so one
model serves every batch size and every sequence length up to
``max_positions``. Gelu is spelled out with Erf because the Gelu operator only
exists from opset 20 on.

Weights follow BERT's initialisation, N(0, 0.02), with biases drawn the same
way (BERT zeroes them, but zero biases would let bias folding and similar
rewrites pass unnoticed when broken). LayerNorm gamma is 1 + N(0, 0.02) and
beta N(0, 0.02). MatMul weights are stored [in, out], as the export transposes
them. Shape and scalar constants are small initializers shared by every layer,
as they are in exports. All of it comes from ``np.random.default_rng(seed)``,
weights first, then the feeds, so a seed fixes both. With the defaults this is
MiniLM-L6-H384: about 22.6M parameters (90 MB) and 216 nodes.
"""

from __future__ import annotations

__all__ = ["build_encoder"]

import logging
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

_OPSET = 17
_IR_VERSION = 8
_WEIGHT_STD = 0.02
_LN_EPSILON = 1e-12  # BERT's layer_norm_eps
_MASK_VALUE = -10000.0
# Masked tail of the sample attention mask, so that the mask path does real work.
_MASKED_TAIL = 8


class _GraphBuilder:
    """Collects named nodes and initializers; every node gets one output named ``<node>_output``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float = _WEIGHT_STD) -> str:
        return self.tensor(name, self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        output = f"{name}_output"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def linear(self, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
        """``x @ W + b`` as MatMul then Add, the way exports write nn.Linear."""
        weight = self.normal(f"{prefix}_weight", (fan_in, fan_out))
        bias = self.normal(f"{prefix}_bias", (fan_out,))
        product = self.op("MatMul", [x, weight], f"{prefix}_matmul")
        return self.op("Add", [product, bias], f"{prefix}_add")

    def layer_norm(self, x: str, prefix: str, hidden: int) -> str:
        noise = self.rng.standard_normal(hidden, dtype=np.float32) * np.float32(_WEIGHT_STD)
        gamma = self.tensor(f"{prefix}_gamma", np.float32(1) + noise)
        beta = self.normal(f"{prefix}_beta", (hidden,))
        return self.op("LayerNormalization", [x, gamma, beta], prefix, axis=-1, epsilon=_LN_EPSILON)


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _shared_constants(graph: _GraphBuilder, hidden: int, heads: int) -> dict[str, str]:
    """Shape and scalar initializers every layer reads; 0 in a Reshape shape keeps that dim."""
    head_dim = hidden // heads
    return {
        "split_heads": graph.tensor("const/split_heads_shape", np.array([0, 0, heads, head_dim], dtype=np.int64)),
        "merge_heads": graph.tensor("const/merge_heads_shape", np.array([0, 0, hidden], dtype=np.int64)),
        "score_scale": graph.tensor("const/sqrt_head_dim", _scalar(np.sqrt(head_dim))),
        "sqrt2": graph.tensor("const/sqrt2", _scalar(np.sqrt(2.0))),
        "one": graph.tensor("const/one", _scalar(1.0)),
        "half": graph.tensor("const/half", _scalar(0.5)),
    }


def _embeddings(graph: _GraphBuilder, vocab: int, max_positions: int, hidden: int) -> str:
    """Word + position + token-type embeddings, then LayerNormalization; positions come from Range."""
    word_table = graph.normal("embeddings/word_table", (vocab, hidden))
    position_table = graph.normal("embeddings/position_table", (max_positions, hidden))
    # Without a token_type_ids input every token has type 0: one row, broadcast.
    token_type = graph.normal("embeddings/token_type_row", (hidden,))
    words = graph.op("Gather", [word_table, "input_ids"], "embeddings/word_gather", axis=0)
    ids_shape = graph.op("Shape", ["input_ids"], "embeddings/ids_shape")
    one_index = graph.tensor("embeddings/sequence_axis", np.array(1, dtype=np.int64))
    length = graph.op("Gather", [ids_shape, one_index], "embeddings/sequence_length", axis=0)
    start = graph.tensor("embeddings/range_start", np.array(0, dtype=np.int64))
    step = graph.tensor("embeddings/range_step", np.array(1, dtype=np.int64))
    positions = graph.op("Range", [start, length, step], "embeddings/position_ids")
    position_rows = graph.op("Gather", [position_table, positions], "embeddings/position_gather", axis=0)
    summed = graph.op("Add", [words, position_rows], "embeddings/add_positions")
    typed = graph.op("Add", [summed, token_type], "embeddings/add_token_type")
    return graph.layer_norm(typed, "embeddings/layer_norm", hidden)


def _extended_mask(graph: _GraphBuilder) -> str:
    """``(1 - mask) * -10000`` shaped [batch, 1, 1, sequence], added to every head's scores."""
    axes = graph.tensor("mask/unsqueeze_axes", np.array([1, 2], dtype=np.int64))
    expanded = graph.op("Unsqueeze", ["attention_mask", axes], "mask/unsqueeze")
    as_float = graph.op("Cast", [expanded], "mask/cast", to=TensorProto.FLOAT)
    inverted = graph.op("Sub", [graph.tensor("mask/one", _scalar(1.0)), as_float], "mask/invert")
    return graph.op("Mul", [inverted, graph.tensor("mask/min_value", _scalar(_MASK_VALUE))], "mask/scale")


def _attention(graph: _GraphBuilder, h: str, mask: str, prefix: str, hidden: int, consts: dict[str, str]) -> str:
    """Multi-head self-attention with output projection, residual Add and LayerNormalization."""
    projected = {}
    # K goes to [batch, heads, head_dim, sequence] directly, so no separate K^T node.
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        x = graph.linear(h, f"{prefix}/{name}", hidden, hidden)
        x = graph.op("Reshape", [x, consts["split_heads"]], f"{prefix}/{name}_split_heads")
        projected[name] = graph.op("Transpose", [x], f"{prefix}/{name}_transpose", perm=perm)
    scores = graph.op("MatMul", [projected["q"], projected["k"]], f"{prefix}/scores")
    scaled = graph.op("Div", [scores, consts["score_scale"]], f"{prefix}/scale")
    masked = graph.op("Add", [scaled, mask], f"{prefix}/add_mask")
    probs = graph.op("Softmax", [masked], f"{prefix}/softmax", axis=-1)
    context = graph.op("MatMul", [probs, projected["v"]], f"{prefix}/context")
    context = graph.op("Transpose", [context], f"{prefix}/context_transpose", perm=[0, 2, 1, 3])
    context = graph.op("Reshape", [context, consts["merge_heads"]], f"{prefix}/merge_heads")
    out = graph.linear(context, f"{prefix}/out", hidden, hidden)
    residual = graph.op("Add", [h, out], f"{prefix}/residual")
    return graph.layer_norm(residual, f"{prefix}/layer_norm", hidden)


def _feed_forward(
    graph: _GraphBuilder, h: str, prefix: str, hidden: int, intermediate: int, consts: dict[str, str]
) -> str:
    """Linear -> exact Gelu (Erf form) -> Linear, residual Add and LayerNormalization."""
    x = graph.linear(h, f"{prefix}/up", hidden, intermediate)
    erf = graph.op("Erf", [graph.op("Div", [x, consts["sqrt2"]], f"{prefix}/gelu_div")], f"{prefix}/gelu_erf")
    shifted = graph.op("Add", [erf, consts["one"]], f"{prefix}/gelu_add")
    gated = graph.op("Mul", [x, shifted], f"{prefix}/gelu_mul")
    gelu = graph.op("Mul", [gated, consts["half"]], f"{prefix}/gelu_half")
    out = graph.linear(gelu, f"{prefix}/down", intermediate, hidden)
    residual = graph.op("Add", [h, out], f"{prefix}/residual")
    return graph.layer_norm(residual, f"{prefix}/layer_norm", hidden)


def _check_config(sizes: dict[str, int]) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if sizes["hidden"] % sizes["heads"]:
        raise ValueError(f"hidden ({sizes['hidden']}) must be a multiple of heads ({sizes['heads']})")
    if sizes["sequence"] > sizes["max_positions"]:
        raise ValueError(f"sequence ({sizes['sequence']}) must not exceed max_positions ({sizes['max_positions']})")


def _sample_feeds(rng: np.random.Generator, vocab: int, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """Random token ids and a mask with its last 8 positions off (at least one position stays on)."""
    input_ids = rng.integers(0, vocab, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.ones((batch, sequence), dtype=np.int64)
    attention_mask[:, sequence - min(_MASKED_TAIL, sequence - 1) :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _assemble(graph: _GraphBuilder, hidden: int) -> onnx.ModelProto:
    """The model around the built nodes: int64 inputs and a float output, all with symbolic batch and sequence."""
    # The last LayerNormalization writes the graph output under the export's
    # public name; nothing else reads its value, so renaming it is safe.
    graph.nodes[-1].output[0] = "last_hidden_state"
    dims = ["batch", "sequence"]
    proto = helper.make_graph(
        graph.nodes,
        "encoder",
        [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden])],
        initializer=graph.initializers,
    )
    opsets = [helper.make_opsetid("", _OPSET)]
    model = helper.make_model(proto, opset_imports=opsets, producer_name="graphopt.model_zoo")
    model.ir_version = _IR_VERSION
    return model


def build_encoder(
    *,
    layers: int = 6,
    hidden: int = 384,
    heads: int = 12,
    intermediate: int = 1536,
    vocab: int = 30522,
    max_positions: int = 512,
    seed: int = 0,
    batch: int = 1,
    sequence: int = 128,
) -> ZooModel:
    """Build the encoder described in the module docstring; the defaults are MiniLM-L6-H384.

    Args:
        layers: Number of transformer layers.
        hidden: Hidden size; a multiple of ``heads``.
        heads: Attention heads per layer.
        intermediate: Width of the feed-forward layer.
        vocab: Rows of the word-embedding table.
        max_positions: Rows of the position-embedding table, the longest sequence the model accepts.
        seed: Seeds ``np.random.default_rng`` for the weights, then the feeds.
        batch: Batch size of the sample feeds (the model's batch dim is symbolic).
        sequence: Sequence length of the sample feeds (the model's dim is symbolic).

    Returns:
        A ZooModel named ``encoder`` with feeds ``input_ids`` and ``attention_mask``.

    Raises:
        ValueError: A size is below 1, ``hidden`` is not a multiple of ``heads``,
            or ``sequence`` exceeds ``max_positions``.
    """
    sizes = {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate}
    _check_config({**sizes, "vocab": vocab, "max_positions": max_positions, "batch": batch, "sequence": sequence})
    rng = np.random.default_rng(seed)
    graph = _GraphBuilder(rng)
    consts = _shared_constants(graph, hidden, heads)
    h = _embeddings(graph, vocab, max_positions, hidden)
    mask = _extended_mask(graph)
    for index in range(layers):
        h = _attention(graph, h, mask, f"layer{index}/attn", hidden, consts)
        h = _feed_forward(graph, h, f"layer{index}/ffn", hidden, intermediate, consts)
    logger.debug("built encoder: %d layers, %d nodes", layers, len(graph.nodes))
    return ZooModel("encoder", _assemble(graph, hidden), _sample_feeds(rng, vocab, batch, sequence))
