"""Built-in passes and the registry that names them.

``BUILTIN_PASSES`` maps each pipeline name to a pass class (or a factory that
returns a pass). Third-party passes register through the entry-point group
``graphopt.passes`` instead of editing this table; see graphopt.registry.
"""

from __future__ import annotations

__all__ = ["BUILTIN_PASSES"]

from graphopt.upgrade_ir import UpgradeIrPass
from passes.dce import EliminateDeadCodePass
from passes.fold import (
    CollapseReshapesPass,
    DeduplicateInitializersPass,
    EliminateCommonSubexpressionsPass,
    EliminateNoOpsPass,
    FoldBatchNormPass,
    FoldConstantsPass,
    FoldElementwisePass,
    FoldTransposesPass,
    FuseMatMulAddPass,
    fold,
)
from passes.lift_constants import LiftConstantsPass
from passes.lowrank import LowRankPass
from passes.prune import PrunePass
from passes.qdq import QuantizePass
from passes.toposort import SortTopologicallyPass

BUILTIN_PASSES = {
    "dce": EliminateDeadCodePass,
    "lift-constants": LiftConstantsPass,
    "toposort": SortTopologicallyPass,
    "upgrade-ir": UpgradeIrPass,
    # The lossless fold group and each of its members.
    "fold": fold,
    "fold-constants": FoldConstantsPass,
    "eliminate-noops": EliminateNoOpsPass,
    "fold-transposes": FoldTransposesPass,
    "collapse-reshapes": CollapseReshapesPass,
    "fold-batchnorm": FoldBatchNormPass,
    "fold-elementwise": FoldElementwisePass,
    "fuse-matmul-add": FuseMatMulAddPass,
    "dedup-initializers": DeduplicateInitializersPass,
    "cse": EliminateCommonSubexpressionsPass,
    # Lossy passes.
    "qdq": QuantizePass,
    "prune": PrunePass,
    "lowrank": LowRankPass,
}
