"""Run a pipeline of passes over a model, keeping a ledger of what each did.

Built on ``onnx_ir.passes``: every step is an ``onnx_ir`` pass, the steps run
inside ``onnx_ir.passes.Sequential``, and fixed-point groups (such as ``fold``)
are ``onnx_ir.passes.PassManager`` instances provided by the registry. This
module only adds two wrapper passes around each step: one that writes a ledger
row, and, with ``check_each_pass``, one that runs onnx.checker and opens an
onnxruntime session so that a broken model is blamed on the pass that broke it.
"""

from __future__ import annotations

__all__ = ["PassFailedError", "PipelineResult", "adopt_model", "build_steps", "run_pipeline"]

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import checks, stats
from graphopt.errors import GraphoptError, PassCheckError, PipelineSpecError, first_line
from graphopt.gcpause import gc_paused
from graphopt.ledger import Ledger, LedgerRow
from graphopt.progress import reporting_to
from graphopt.registry import PassFactory, available_passes, create_pass, pass_options, resolved_options
from graphopt.spec import PassSpec, load_recipe, parse_spec
from graphopt.upgrade_ir import FIRST_SEPARATE_INITIALIZERS, UpgradeIrPass

logger = logging.getLogger(__name__)

# Called as progress(index, total, name) before step ``index`` (0-based) runs,
# and once more with index == total when the pipeline is done.
ProgressCallback = Callable[[int, int, str], None]


class PassFailedError(ir.passes.PassError):
    """A pass raised an exception that is not graphopt's report on bad input: a bug, in graphopt or a plug-in.

    A PassError, as onnx_ir's pass manager raises for it; the message names
    the step and the original exception, which is the ``__cause__``.
    """

    def __init__(self, message: str, pass_name: str) -> None:
        super().__init__(message)
        self.pass_name = pass_name


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
    pipeline: str | Path | Sequence[str | PassSpec | ir.passes.PassBase],
    passes: Mapping[str, PassFactory] | None = None,
) -> list[_Step]:
    """Turns a spec string, a recipe path, or a list of spec strings/specs/passes into steps.

    A ``str`` is a spec string (in a list too, where it may hold several
    steps: ``["fold,dce", pass_]``); a ``Path`` is a recipe file. A pass
    instance's step takes its registered name and the options it holds.

    Raises:
        PipelineSpecError: Unknown pass or option, malformed spec, an empty
            pipeline, or a list item of another type (a pass class, say).
    """
    passes = available_passes() if passes is None else passes
    steps = []
    for item in _pipeline_items(pipeline):
        if isinstance(item, ir.passes.PassBase):
            steps.append(_Step(_registered_name(type(item), passes), _instance_options(item), item))
        else:
            pass_ = create_pass(item, passes)
            steps.append(_Step(item.name, resolved_options(passes[item.name], item.options), pass_))
    return steps


def _pipeline_items(pipeline: object) -> list[PassSpec | ir.passes.PassBase]:
    if isinstance(pipeline, Path):
        return list(load_recipe(pipeline))
    if isinstance(pipeline, str):
        return list(parse_spec(pipeline))
    if not isinstance(pipeline, Iterable):
        raise PipelineSpecError(
            f"a pipeline is a spec string, a recipe Path or a list of steps, not a {type(pipeline).__name__}"
        )
    items: list[PassSpec | ir.passes.PassBase] = []
    for item in pipeline:
        if isinstance(item, str):
            items.extend(parse_spec(item))
        elif isinstance(item, (PassSpec, ir.passes.PassBase)):
            items.append(item)
        elif isinstance(item, type):
            name = item.__name__
            raise PipelineSpecError(f"pipeline step {name} is a class, not a pass: give {name}() or its name")
        else:
            raise PipelineSpecError(
                f"pipeline step of type {type(item).__name__} is not a spec string, PassSpec or onnx_ir pass instance"
            )
    if not items:
        raise PipelineSpecError("the pipeline is empty: name at least one pass, e.g. 'dce'")
    return items


def _registered_name(cls: type, passes: Mapping[str, PassFactory]) -> str:
    """The name ``cls`` is registered under, or the class name for a pass the registry does not know."""
    return next((name for name, factory in passes.items() if factory is cls), cls.__name__)


def _instance_options(pass_: ir.passes.PassBase) -> dict[str, Any]:
    """The options an instance holds: each option of its class found as an attribute of the same name.

    Only JSON-ready values (scalars, strings, lists of them) are recorded;
    others are left out rather than stringified, e.g. a ``data`` iterable of
    feeds (arrays), or an option the pass stores converted (a set, a dict).
    An option the pass keeps under another name is not recorded either.
    """
    try:
        names = pass_options(type(pass_))
    except (TypeError, ValueError):  # no introspectable signature
        return {}
    options = {}
    for name in names:
        value = getattr(pass_, name, _MISSING)
        if _plain(value) or (isinstance(value, (list, tuple)) and all(_plain(element) for element in value)):
            options[name] = list(value) if isinstance(value, tuple) else value
    return options


_MISSING = object()


def _plain(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


def run_pipeline(
    model: ir.Model,
    pipeline: str | Path | Sequence[str | PassSpec | ir.passes.PassBase],
    *,
    check_each_pass: bool = False,
    progress: ProgressCallback | None = None,
    passes: Mapping[str, PassFactory] | None = None,
) -> PipelineResult:
    """Runs the pipeline over ``model`` in place.

    Args:
        model: The model to rewrite.
        pipeline: A spec string such as ``"lift-constants,dce"``, a recipe
            file ``Path``, or a list of spec strings, ``PassSpec`` and pass
            instances.
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
        PassFailedError: a pass raised anything else (a bug, in graphopt or
            in a plug-in); its cause is the original exception.
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
        # model or options surface as themselves, and so does the
        # PassFailedError the step's wrapper raised for anything else.
        cause = exc.__cause__
        if isinstance(cause, (GraphoptError, ir.passes.PreconditionError, PassFailedError)):
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
        try:
            result = self._run(model)
        except Exception as exc:  # noqa: BLE001 - re-raised, named after the step
            raise self._failure(exc)  # noqa: B904 - _failure chains the original cause itself
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

    def _run(self, model: ir.Model) -> ir.passes.PassResult:
        if self.progress is None:
            return self.step.pass_(model)
        self.progress(self.index, self.total, self.step.label)
        name = self.step.label.split("(")[0]  # the options can be long; the bar has one line
        with reporting_to(lambda label: self.progress(self.index, self.total, label), name):  # type: ignore[misc]
            return self.step.pass_(model)

    def _failure(self, exc: Exception) -> Exception:
        """What to raise for ``exc``: the user-facing error itself, else a PassFailedError naming this step."""
        cause: BaseException = exc
        # A group (fold) wraps its members' errors in PassError: the first other cause says what happened.
        while type(cause) is ir.passes.PassError and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (GraphoptError, ir.passes.PreconditionError)):
            cause.__suppress_context__ = True  # not "from None", which would drop its own cause
            return cause
        where = f"pass {self.step.label!r} (step {self.index + 1} of {self.total})"
        failed = PassFailedError(f"{where} failed: {type(cause).__name__}: {first_line(cause)}", self.step.label)
        failed.__cause__ = cause
        return failed

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
