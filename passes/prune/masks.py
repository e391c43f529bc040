"""Which weights pruning zeroes: magnitude masks, unstructured and N:M.

Pure numpy; ties in magnitude are broken by position (a stable sort), so a
mask is deterministic and hits its target count exactly.
"""

from __future__ import annotations

__all__ = ["unstructured_mask", "global_threshold_masks", "n_of_m_mask", "parse_n_of_m"]

import re
from collections.abc import Sequence

import numpy as np

_N_OF_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def unstructured_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keeps all but the ``round(sparsity * size)`` smallest-magnitude entries."""
    flat = np.abs(weight).ravel()
    pruned = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[:pruned]] = False
    return mask.reshape(weight.shape)


def global_threshold_masks(weights: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One magnitude ranking across all ``weights``: the smallest ``sparsity`` share of all entries go."""
    flat = np.concatenate([np.abs(w).ravel() for w in weights]) if weights else np.zeros(0)
    pruned = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:pruned]] = False
    masks, start = [], 0
    for weight in weights:
        masks.append(keep[start : start + weight.size].reshape(weight.shape))
        start += weight.size
    return masks


def n_of_m_mask(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray | None:
    """Keeps the ``n`` largest of every ``m`` consecutive entries along ``axis``; None if ``m`` does not divide it."""
    axis = axis % weight.ndim
    if weight.shape[axis] % m:
        return None
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def parse_n_of_m(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None for anything that is not ``N:M`` with 0 < N < M."""
    match = _N_OF_M.match(pattern)
    if not match:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    return (n, m) if 0 < n < m else None
