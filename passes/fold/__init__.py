"""``fold``: the lossless simplification group, run to a fixed point.

Each member is also registered under its own name (see passes/__init__.py).
The group runs them in the order below inside ``onnx_ir.passes.PassManager``
with ``early_stop=True``, so it repeats until a whole round changes nothing
(or ``max_rounds`` rounds ran): one rewrite often exposes another, e.g. a
folded BatchNorm leaves a Conv whose following Mul can then fold too.

Standalone BatchNorm -> Mul+Add is off inside the group: on its own it adds
a node, and the group only keeps rewrites that shrink the graph. Rewriting
weights (BatchNorm, Mul/Div folding) reorders float32 rounding, so outputs
move by float32 rounding of the new weights (observed up to ~2e-6 relative to
the output scale); everything else is exact.
"""

from __future__ import annotations

__all__ = [
    "fold",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "DeduplicateInitializersPass",
    "EliminateCommonSubexpressionsPass",
    "FoldElementwisePass",
    "FuseMatMulAddPass",
    "FoldTransposesPass",
    "CollapseReshapesPass",
    "EliminateNoOpsPass",
]

import onnx_ir as ir

from passes.dce import EliminateDeadCodePass
from passes.fold.batchnorm import FoldBatchNormPass
from passes.fold.constants import FoldConstantsPass
from passes.fold.dedup import DeduplicateInitializersPass, EliminateCommonSubexpressionsPass
from passes.fold.elementwise import FoldElementwisePass, FuseMatMulAddPass
from passes.fold.layout import CollapseReshapesPass, FoldTransposesPass
from passes.fold.noops import EliminateNoOpsPass
from passes.lift_constants import LiftConstantsPass


def fold(*, max_rounds: int = 8, max_growth: float = 4.0, max_output_bytes: int = 1 << 20) -> ir.passes.PassBase:
    """The fold group: every lossless rewrite, repeated until nothing changes.

    Args:
        max_rounds: Upper bound on rounds of the whole group.
        max_growth: Constant folding's size guard (see FoldConstantsPass).
        max_output_bytes: Constant folding's size guard (see FoldConstantsPass).
    """
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    members: list[ir.passes.PassBase] = [
        LiftConstantsPass(),
        FoldConstantsPass(max_growth=max_growth, max_output_bytes=max_output_bytes),
        EliminateNoOpsPass(),
        FoldTransposesPass(),
        CollapseReshapesPass(),
        FoldBatchNormPass(standalone=False),
        FoldElementwisePass(),
        FuseMatMulAddPass(),
        DeduplicateInitializersPass(),
        EliminateCommonSubexpressionsPass(),
        EliminateDeadCodePass(),
    ]
    return ir.passes.PassManager(members, steps=max_rounds, early_stop=True)


fold.visits_subgraphs = True  # type: ignore[attr-defined]
