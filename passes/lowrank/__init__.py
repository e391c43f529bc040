"""``lowrank``: low-rank decomposition of MatMul/Gemm weights and Conv kernels; see lowrank.py."""

from __future__ import annotations

__all__ = ["LowRankPass", "LowRankSummary"]

from passes.lowrank.lowrank import LowRankPass, LowRankSummary
