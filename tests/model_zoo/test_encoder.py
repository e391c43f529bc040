"""model_zoo.encoder: a valid, dynamic-shape BERT-style encoder that computes what BERT computes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_zoo import ZooModel
from model_zoo.encoder import build_encoder

SMALL = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab": 1000}


@pytest.fixture(scope="module")
def small() -> ZooModel:
    return build_encoder(**SMALL)


@pytest.fixture(scope="module")
def small_session(small: ZooModel) -> ort.InferenceSession:
    return _session(small.model)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    output: np.ndarray = session.run(["last_hidden_state"], feeds)[0]
    return output


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * gamma + beta


def _numpy_bert(w: dict[str, np.ndarray], feeds: dict[str, np.ndarray], layers: int, heads: int) -> np.ndarray:
    """BERT's forward pass written independently of the graph, in float64."""
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch, sequence = ids.shape
    h = w["embeddings/word_table"][ids] + w["embeddings/position_table"][:sequence] + w["embeddings/token_type_row"]
    h = _layer_norm(h, w["embeddings/layer_norm_gamma"], w["embeddings/layer_norm_beta"])
    bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
    hidden = h.shape[-1]
    head_dim = hidden // heads

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}_weight"] + w[f"{prefix}_bias"]

    def split(x: np.ndarray) -> np.ndarray:
        return x.reshape(batch, sequence, heads, head_dim).transpose(0, 2, 1, 3)

    for i in range(layers):
        a, f = f"layer{i}/attn", f"layer{i}/ffn"
        q, k, v = (split(linear(h, f"{a}/{name}")) for name in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, sequence, hidden)
        h = _layer_norm(h + linear(context, f"{a}/out"), w[f"{a}/layer_norm_gamma"], w[f"{a}/layer_norm_beta"])
        up = linear(h, f"{f}/up")
        gelu = 0.5 * up * (1.0 + np.vectorize(math.erf)(up / math.sqrt(2.0)))
        h = _layer_norm(h + linear(gelu, f"{f}/down"), w[f"{f}/layer_norm_gamma"], w[f"{f}/layer_norm_beta"])
    return h


def test_model_passes_full_check_when_small(small: ZooModel) -> None:
    onnx.checker.check_model(small.model, full_check=True)


def test_interface_is_symbolic_batch_and_sequence_when_built(small: ZooModel) -> None:
    model = small.model
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [v.name for v in model.graph.input] == ["input_ids", "attention_mask"]
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert _dims(value) == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "last_hidden_state"
    assert _dims(output) == ["batch", "sequence", SMALL["hidden"]]
    assert small.name == "encoder"
    assert list(small.feeds) == ["input_ids", "attention_mask"]


def test_nodes_have_unique_meaningful_names_when_built(small: ZooModel) -> None:
    names = [node.name for node in small.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert {"layer0/attn/q_matmul", "layer1/ffn/gelu_erf", "embeddings/word_gather"} <= set(names)


def test_sample_feeds_mask_the_last_8_positions_when_built(small: ZooModel) -> None:
    ids, mask = small.feeds["input_ids"], small.feeds["attention_mask"]
    assert ids.shape == mask.shape == (1, 128)
    assert ids.dtype == mask.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < SMALL["vocab"]
    assert mask[0, :120].all() and not mask[0, 120:].any()


def test_output_is_finite_and_varies_when_run(small: ZooModel, small_session: ort.InferenceSession) -> None:
    output = _run(small_session, small.feeds)
    assert output.shape == (1, 128, SMALL["hidden"])
    assert np.isfinite(output).all()
    # Post-LayerNorm activations: near unit spread, different per token.
    assert 0.5 < output.std() < 2.0
    assert np.ptp(output[0, :, 0]) > 0.1


def test_output_matches_numpy_bert_when_run(small: ZooModel, small_session: ort.InferenceSession) -> None:
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in small.model.graph.initializer}
    expected = _numpy_bert(weights, small.feeds, SMALL["layers"], SMALL["heads"])
    np.testing.assert_allclose(_run(small_session, small.feeds), expected, rtol=1e-4, atol=1e-4)


def test_masked_tokens_do_not_change_other_positions_when_run(
    small: ZooModel, small_session: ort.InferenceSession
) -> None:
    changed = {name: array.copy() for name, array in small.feeds.items()}
    changed["input_ids"][0, 120:] = (changed["input_ids"][0, 120:] + 1) % SMALL["vocab"]
    before, after = _run(small_session, small.feeds), _run(small_session, changed)
    np.testing.assert_allclose(after[0, :120], before[0, :120], rtol=0, atol=1e-6)
    assert not np.allclose(after[0, 120:], before[0, 120:])


def test_same_model_runs_other_batch_and_sequence_when_dims_are_symbolic(
    small: ZooModel, small_session: ort.InferenceSession
) -> None:
    other = build_encoder(**SMALL, batch=2, sequence=32)
    # Feeds are drawn after the weights, so the feed shape leaves the model unchanged.
    assert other.model.SerializeToString() == small.model.SerializeToString()
    output = _run(small_session, other.feeds)
    assert output.shape == (2, 32, SMALL["hidden"])
    assert np.isfinite(output).all()
    assert not np.allclose(output[0], output[1])


def test_build_is_deterministic_when_seed_is_fixed() -> None:
    first, second, other = (build_encoder(**SMALL, seed=seed) for seed in (3, 3, 4))
    assert first.model.SerializeToString() == second.model.SerializeToString()
    for name in first.feeds:
        np.testing.assert_array_equal(first.feeds[name], second.feeds[name])
    assert first.model.SerializeToString() != other.model.SerializeToString()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden": 60, "heads": 8}, "multiple of heads"),
        ({"sequence": 600}, "max_positions"),
        ({"layers": 0}, "layers must be >= 1"),
    ],
)
def test_build_raises_value_error_when_config_is_invalid(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_encoder(**{**SMALL, **overrides})


def test_defaults_are_minilm_sized_when_built() -> None:
    encoder = build_encoder()
    model = encoder.model
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    nbytes = sum(len(t.raw_data) for t in model.graph.initializer)
    nodes = len(model.graph.node)
    print(f"default encoder: {params:,} parameters, {nbytes:,} bytes of weights, {nodes} nodes")
    assert 22_000_000 <= params <= 23_000_000
    assert 85e6 < nbytes < 95e6
    assert 200 <= nodes <= 350
    onnx.checker.check_model(model, full_check=True)
    output = _run(_session(model), encoder.feeds)
    assert output.shape == (1, 128, 384)
    assert np.isfinite(output).all() and output.std() > 0.5
