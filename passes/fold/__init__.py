"""``fold``: the lossless simplification group, run to a fixed point.

Each member is also registered under its own name (see passes/__init__.py).
The group runs them in the order below, round after round, until every
member has seen the model without changing it (or ``max_rounds`` rounds ran):
one rewrite often exposes another, e.g. a folded BatchNorm leaves a Conv
whose following Mul can then fold too. That is the fixed point of
``onnx_ir.passes.PassManager(early_stop=True)``, reached with less work (see
:class:`FixedPointGroup`): the group stops mid-round once the members after
the last change have all found nothing, and a member that declares
``trigger_ops`` is skipped while the model holds none of those op types.

Standalone BatchNorm -> Mul+Add is off inside the group: on its own it adds
a node, and the group only keeps rewrites that shrink the graph. Rewriting
weights (BatchNorm, Mul/Div folding) reorders float32 rounding, so outputs
move by float32 rounding of the new weights (observed up to ~2e-6 relative to
the output scale); everything else is exact.
"""

from __future__ import annotations

__all__ = [
    "fold",
    "FixedPointGroup",
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

from collections.abc import Sequence

import onnx_ir as ir

from graphopt.graphs import iter_graphs
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
        # First, so that the rewrites below do not spend time on dead nodes;
        # the group ends only after it has seen the final model too.
        EliminateDeadCodePass(),
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
    ]
    return FixedPointGroup(members, max_rounds=max_rounds)


class FixedPointGroup(ir.passes.InPlacePass):
    """Runs in-place passes in order, cyclically, until each has seen the model unchanged.

    The group stops as soon as every member, one after another, has run on
    the current model without changing it; that is the fixed point, and it
    is reached mid-round when the last change came early in a round (so the
    members after it need not run again). ``max_rounds`` bounds the number
    of rounds over all members.

    A member with a ``trigger_ops`` attribute (a set of op types) is skipped,
    and counts as having seen the model unchanged, when no node of the model,
    its subgraphs or functions has one of those op types. The op-type set is
    recomputed only when it may be out of date (a member changed the model
    since) and says a member could be skipped; a stale set that still lists a
    trigger just lets the member run.
    """

    visits_subgraphs = True

    def __init__(self, passes: Sequence[ir.passes.PassBase], *, max_rounds: int) -> None:
        super().__init__()
        self.passes = list(passes)
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        unchanged_in_a_row = 0
        present: frozenset[str] | None = None
        stale = False
        for _ in range(self.max_rounds):
            for pass_ in self.passes:
                if unchanged_in_a_row == len(self.passes):
                    return ir.passes.PassResult(model, modified)
                triggers = getattr(pass_, "trigger_ops", None)
                if triggers is not None:
                    # After a change ``present`` is stale: it may miss op types
                    # the change created, so only a fresh set may skip a member.
                    if present is None or (stale and present.isdisjoint(triggers)):
                        present, stale = _op_types(model), False
                    if present.isdisjoint(triggers):
                        unchanged_in_a_row += 1
                        continue
                result = pass_(model)
                if result.model is not model:
                    raise ir.passes.PassError(f"{type(pass_).__name__} returned a new model; fold members work in place")
                if result.modified:
                    modified, unchanged_in_a_row, stale = True, 0, True
                else:
                    unchanged_in_a_row += 1
        return ir.passes.PassResult(model, modified)


def _op_types(model: ir.Model) -> frozenset[str]:
    """Op types of every node in the model, its subgraphs and functions (any domain)."""
    return frozenset(node.op_type for graph in iter_graphs(model) for node in graph)


fold.visits_subgraphs = True  # type: ignore[attr-defined]
