"""The models with real weights: ``digits_cnn()`` (committed) and ``minilm()`` (exported on demand, ``zoo`` extra)."""

from __future__ import annotations

__all__ = ["digits_cnn", "minilm"]

from model_zoo.digits import digits_cnn


def minilm(sequence: int = 128):  # noqa: ANN201 - the ZooModel comes from model_zoo.minilm
    """all-MiniLM-L6-v2 with its real weights; see :func:`model_zoo.minilm.minilm`."""
    from model_zoo import minilm as text

    return text.minilm(sequence=sequence)
