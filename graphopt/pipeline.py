"""Run a pipeline of passes over a model, keeping a ledger of what each did.

Built on ``onnx_ir.passes``: every step is an ``onnx_ir`` pass, the steps run
inside ``onnx_ir.passes.Sequential``, and fixed-point groups (such as ``fold``)
are ``onnx_ir.passes.PassManager`` instances provided by the registry. This
module only adds two wrapper passes around each step: one that writes a ledger
row, and, with ``check_each_pass``, one that runs onnx.checker and opens an
onnxruntime session so that a broken model is blamed on the pass that broke it.
"""

from __future__ import annotations

__all__ = ["PipelineResult", "adopt_model", "build_steps", "run_pipeline"]

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import checks, stats
from graphopt.errors import GraphoptError, PassCheckError
from graphopt.gcpause import gc_paused
from graphopt.ledger import Ledger, LedgerRow
from graphopt.progress import reporting_to
from graphopt.registry import PassFactory, available_passes, create_pass, resolved_options
from graphopt.spec import PassSpec, load_recipe, parse_spec
from graphopt.upgrade_ir import FIRST_SEPARATE_INITIALIZERS, UpgradeIrPass

logger = logging.getLogger(__name__)

# Called as progress(index, total, name) before step ``index`` (0-based) runs,
# and once more with index == total when the pipeline is done.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PipelineResult:
    """The rewritten model (the same object, changed in place), and what changed."""

    model: ir.Model
    modified: bool
    ledger: Ledger


@dataclass(frozen=True)
class _Step:
    label: str
    options: dict[str, Any]
    pass_: ir.passes.PassBase


def build_steps(
    pipeline: str | Path | Sequence[PassSpec | ir.passes.PassBase],
    passes: Mapping[str, PassFactory] | None = None,
) -> list[_Step]:
    """Turns a spec string, a recipe path, or a list of specs/passes into steps.

    A ``str`` is a spec string; a ``Path`` is a recipe file.

    Raises:
        PipelineSpecError: Unknown pass or option, or malformed spec.
    """
    if isinstance(pipeline, Path):
        items: Sequence[PassSpec | ir.passes.PassBase] = load_recipe(pipeline)
    elif isinstance(pipeline, str):
        items = parse_spec(pipeline)
    else:
        items = pipeline
    passes = available_passes() if passes is None else passes
    steps = []
    for item in items:
        if isinstance(item, ir.passes.PassBase):
            steps.append(_Step(type(item).__name__, {}, item))
        else:
            pass_ = create_pass(item, passes)
            steps.append(_Step(item.name, resolved_options(passes[item.name], item.options), pass_))
    return steps


def run_pipeline(
    model: ir.Model,
    pipeline: str | Path | Sequence[PassSpec | ir.passes.PassBase],
    *,
    check_each_pass: bool = False,
    progress: ProgressCallback | None = None,
    passes: Mapping[str, PassFactory] | None = None,
) -> PipelineResult:
    """Runs the pipeline over ``model`` in place.

    Args:
        model: The model to rewrite.
        pipeline: A spec string such as ``"lift-constants,dce"``, a recipe
            file ``Path``, or a list of ``PassSpec`` / pass instances.
        check_each_pass: After every pass, run onnx.checker (full) and open an
            onnxruntime session; raise ``PassCheckError`` naming the pass that
            produced an invalid model.
        progress: Optional callback, see ``ProgressCallback``.
        passes: Registry to resolve names in; defaults to every known pass.

    A model below IR version 4 is first raised to 4 (graphopt/upgrade_ir.py,
    its own ledger row): its initializers are graph inputs there, which no
    pass may rewrite, though onnxruntime treats them as constants.

    Returns:
        The model, whether any pass changed it, and the ledger.

    Raises:
        PipelineSpecError: Bad spec. PassCheckError: a pass broke the model.
        onnx_ir.passes.PreconditionError: a pass cannot handle this model.
    """
    steps = build_steps(pipeline, passes)
    if model.ir_version < FIRST_SEPARATE_INITIALIZERS and steps and not isinstance(steps[0].pass_, UpgradeIrPass):
        steps.insert(0, _Step("upgrade-ir", {}, UpgradeIrPass()))
    ledger = Ledger()
    wrapped = [
        _LedgeredPass(step, index, len(steps), ledger, check_each_pass, progress)
        for index, step in enumerate(steps)
    ]
    try:
        with gc_paused():
            result = ir.passes.Sequential(*wrapped)(model)
    except ir.passes.PassError as exc:
        # Sequential wraps everything in PassError; errors about the user's
        # model or options surface as themselves, bugs keep the full chain.
        cause = exc.__cause__
        if isinstance(cause, (GraphoptError, ir.passes.PreconditionError)):
            # Not "from None": that would also drop the error's own cause (an
            # onnxruntime failure, say), which --debug should show.
            cause.__suppress_context__ = True
            raise cause  # noqa: B904 - the PassError wrapper is hidden on purpose
        raise
    if progress is not None:
        progress(len(steps), len(steps), "done")
    return PipelineResult(result.model, result.modified, ledger)


class _LedgeredPass(ir.passes.InPlacePass):
    """Runs one step, records a ledger row, and optionally checks the result."""

    def __init__(
        self,
        step: _Step,
        index: int,
        total: int,
        ledger: Ledger,
        check: bool,
        progress: ProgressCallback | None,
    ) -> None:
        super().__init__()
        self.step = step
        self.index = index
        self.total = total
        self.ledger = ledger
        self.check = check
        self.progress = progress

    def __str__(self) -> str:
        return self.step.label

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before, bytes_before = self._figures_before(model)
        start = time.perf_counter()
        if self.progress is None:
            result = self.step.pass_(model)
        else:
            self.progress(self.index, self.total, self.step.label)
            name = self.step.label.split("(")[0]  # the options can be long; the bar has one line
            with reporting_to(lambda label: self.progress(self.index, self.total, label), name):  # type: ignore[misc]
                result = self.step.pass_(model)
        seconds = time.perf_counter() - start
        if result.model is not model:
            # Keep the in-place contract of the wrapper for functional inner passes.
            adopt_model(model, result.model)
        # An unmodified model has the same figures; skipping the walk matters
        # on 100k-node graphs, where it costs more than most passes.
        changed = result.modified or result.model is not model
        self.ledger.append(
            LedgerRow(
                name=self.step.label,
                options=self.step.options,
                seconds=seconds,
                nodes_before=nodes_before,
                nodes_after=stats.node_count(model) if changed else nodes_before,
                param_bytes_before=bytes_before,
                param_bytes_after=stats.param_bytes(model) if changed else bytes_before,
                modified=result.modified,
                details=_details(self.step.pass_),
            )
        )
        logger.info("pass %s: modified=%s in %.3f s", self.step.label, result.modified, seconds)
        if self.check:
            self._check(model)
        return ir.passes.PassResult(model, result.modified)

    def _figures_before(self, model: ir.Model) -> tuple[int, int]:
        # Nothing edits the model between steps, so the previous row's "after"
        # figures are this step's "before"; each walk costs ~0.2 s at 100k nodes.
        if self.ledger.rows:
            last = self.ledger.rows[-1]
            return last.nodes_after, last.param_bytes_after
        return stats.node_count(model), stats.param_bytes(model)

    def _check(self, model: ir.Model) -> None:
        try:
            checks.check_model(model)
        except ValueError as exc:
            raise PassCheckError(
                f"pass {self.step.label!r} (step {self.index + 1} of {self.total}) "
                f"produced an invalid model: {exc}"
            ) from exc


def _details(pass_: ir.passes.PassBase) -> dict[str, Any]:
    """A pass's own report of its last run: its ``details()`` method, when it has one."""
    report = getattr(pass_, "details", None)
    return dict(report()) if callable(report) else {}


def adopt_model(target: ir.Model, source: ir.Model) -> None:
    """Moves ``source``'s content into the ``target`` object (for passes that must work in place)."""
    target.graph = source.graph  # opset imports live on the graph
    target.functions.clear()
    target.functions.update(source.functions)
    target.ir_version = source.ir_version
    target.metadata_props.clear()
    target.metadata_props.update(source.metadata_props)
