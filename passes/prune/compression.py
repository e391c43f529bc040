"""Storage report for pruned weights: dense bytes, int8 + entropy coding, and the order-0 bound.

Deep Compression's point is that zeros compress: after pruning, weights are
quantized to int8 (symmetric, per output channel) and entropy coded. The
report gives what zlib and lzma achieve on those int8 bytes and the order-0
entropy of the int8 symbols, the bound a symbol-by-symbol coder cannot beat.
"""

from __future__ import annotations

__all__ = ["CompressionReport", "compression_report"]

import lzma
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from passes.qdq.arithmetic import quantize_per_channel


@dataclass(frozen=True)
class CompressionReport:
    dense_bytes: int
    int8_bytes: int
    zlib_bytes: int
    lzma_bytes: int
    entropy_bound_bytes: int

    @property
    def bound_efficiency(self) -> float:
        """Entropy bound / best coder's bytes: 1.0 means the coder reached the bound."""
        best = min(self.zlib_bytes, self.lzma_bytes)
        return self.entropy_bound_bytes / best if best else 1.0


def compression_report(weights: Sequence[np.ndarray]) -> CompressionReport:
    """The report for the given (pruned) float weights, each quantized along axis 0."""
    symbols = [quantize_per_channel(np.asarray(w, dtype=np.float32), 0)[0].ravel() for w in weights]
    data = np.concatenate(symbols) if symbols else np.zeros(0, np.int8)
    raw = data.tobytes()
    _, counts = np.unique(data, return_counts=True)
    probabilities = counts / max(data.size, 1)
    bits = float(-(counts * np.log2(probabilities)).sum()) if data.size else 0.0
    return CompressionReport(
        dense_bytes=sum(int(np.asarray(w).nbytes) for w in weights),
        int8_bytes=len(raw),
        zlib_bytes=len(zlib.compress(raw, 9)),
        lzma_bytes=len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
        entropy_bound_bytes=int(np.ceil(bits / 8)),
    )
