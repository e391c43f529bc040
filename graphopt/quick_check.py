"""A quick look at how far lossy passes moved a model's outputs, so that no collapse goes unnoticed.

``graphopt optimize`` without ``--validate`` runs it when a lossy pass
changed the model: the input file against the rewritten model, on
:data:`SAMPLES` synthesized samples, onnxruntime CPU, worst output cosine.
Some lossy settings measure nothing themselves (``lowrank(ratio=0.5)``,
``prune(pattern=channel)`` without data): on all-MiniLM-L6-v2 the first
hands back output cosine 0.54, and before this check nothing said so.

With ``--calib-data`` it runs on (the first :data:`SAMPLES` of) those
samples instead: real inputs, but the ones the passes fitted, so the line
says new inputs may land lower and names ``graphopt validate ... --data
HELD_OUT`` for an unbiased figure. (On the digits CNN, qdq calibrated on
real digits measured cosine 0.97 on synthesized N(0, 1) feeds and 0.99999
on digits: synthesized feeds flagged a collapse that was not there.)

It is a smoke test, not a validation: synthesized inputs are not the
user's, and four samples say little about the tail; the line it prints
says that and names ``--validate``. It never fails the run (a model whose
synthesized inputs it cannot run is reported as not checked), and it skips
models whose weights exceed :data:`MAX_WEIGHT_BYTES`, where two more
onnxruntime sessions would cost real memory and minutes.
"""

from __future__ import annotations

__all__ = ["quick_check", "hint_for_step", "SAMPLES", "ADVISED_COSINE", "MAX_WEIGHT_BYTES"]

import itertools
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from graphopt import stats
from graphopt.data import load_feeds, without_labels
from graphopt.errors import GraphoptError, first_line
from graphopt.ledger import format_bytes
from graphopt.metrics import ComparisonResult, Tolerance
from graphopt.spec import parse_value
from graphopt.validate import validate

SAMPLES = 4
ADVISED_COSINE = 0.99  # below it the result is reported as a warning
MAX_WEIGHT_BYTES = 1 << 30

logger = logging.getLogger(__name__)

# An option setting a fidelity_hint recommends, such as "target_cosine=0.99" or "reconstruct=true".
_SETTING = re.compile(r"\b([A-Za-z_]\w*)=(\S+)")
_ALREADY = "already ran with "


def quick_check(
    original: str | os.PathLike[str],
    rewritten: ir.Model,
    lossy: Mapping[str, str],
    *,
    shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None = None,
    threads: int | None = None,
    data: Any = None,
    output: str | os.PathLike[str] | None = None,
    original_bytes: int = 0,
) -> str:
    """One line saying how far ``rewritten``'s outputs are from the model in ``original``, for the CLI to print.

    ``lossy`` maps each step that changed the model to what would keep it
    closer (its pass's ``fidelity_hint``, may be empty). ``data`` is the
    calibration data the passes were given (``--calib-data``): the check
    runs on its first :data:`SAMPLES` samples rather than synthesized ones.
    ``output`` is where the result goes, for the command the line suggests.
    ``original_bytes`` is the input's size: the check loads it too, so it
    counts against :data:`MAX_WEIGHT_BYTES` as the result's weights do.
    Never raises for a model it cannot check: the line says why.
    """
    steps = ", ".join(lossy)
    hints = "; ".join(f"{step}: {hint}" for step, hint in lossy.items() if hint)
    closer = f"; closer: {hints}" if hints else ""
    if any(hint.startswith(_ALREADY) for hint in lossy.values()):
        # The recommended settings were in use: say why the result can still miss.
        several = "each pass's target is measured against its own input, so targets compound across passes"
        closer += f"; {several}" if len(lossy) > 1 else "; a stricter target or a milder setting keeps it closer"
    held_out = f"graphopt validate {original} {output or 'OUTPUT'} --data HELD_OUT"
    # Where to look next: the user who gave data needs held-out data, not --calib-data again.
    advice = f"for an unbiased figure run {held_out}" if data is not None else "for real inputs add --validate cpu --calib-data DIR"
    if max(stats.param_bytes(rewritten), original_bytes) > MAX_WEIGHT_BYTES:
        return f"quick check skipped: weights over {format_bytes(MAX_WEIGHT_BYTES)}; {advice}"
    try:
        # atol 0 counts every differing element: for integer outputs, the values that changed.
        tolerance = Tolerance(min_cosine=ADVISED_COSINE, atol=0.0)
        # Labels would ask validate for a task metric: a smoke test of the outputs has no use for it.
        feeds = None if data is None else [without_labels(s) for s in itertools.islice(load_feeds(data), SAMPLES)]
        report = validate(original, rewritten, feeds, samples=SAMPLES, shapes=shapes, threads=threads, tolerance=tolerance)
    except GraphoptError as exc:
        return f"quick check not run ({first_line(exc)}); {advice}"
    except Exception as exc:  # noqa: BLE001 - a smoke test must never cost the user the pipeline's result
        logger.debug("quick check failed", exc_info=True)
        return f"quick check failed ({type(exc).__name__}: {first_line(exc)}); {advice}"
    # An output whose shape changed has no cosine: its reason says what happened.
    broken = [result for _, result in report.outputs if not result.compared and not result.passed]
    if broken:
        return f"warning: {steps} changed output {broken[0].name}: {broken[0].reason}{closer}"
    compared = [result for _, result in report.outputs if result.compared]
    if not compared:
        return "quick check: no output held values to compare (all empty)"
    # Integer outputs (class indices from an ArgMax, say) agree or not; a cosine of them means nothing.
    integer = _integer_outputs(rewritten)
    scores = [result for result in compared if result.name not in integer]
    labels = [result for result in compared if result.name in integer]
    if feeds is None:
        where, follow = f"{SAMPLES} synthesized samples", ". Check with real inputs (--validate cpu --calib-data DIR)"
    else:
        where, follow = f"{len(feeds)} of the calibration samples the passes fitted (new inputs may land lower)", f"; {advice}"
    unmeasurable = [r for r in compared if r.nan_reference + r.inf_reference and not math.isfinite(r.cosine)]
    if unmeasurable:  # NaN/Inf in the calibration data, say: the input's own outputs are not numbers there
        first = unmeasurable[0]
        count = first.nan_reference + first.inf_reference
        return (
            f"quick check after {steps}: the input model's own output {first.name} holds {count} NaN/Inf values on {where}, "
            f"so no cosine measures the change; {advice}"
        )
    parts, close = [], True
    if scores:
        worst = min(scores, key=lambda result: _order(result.cosine))
        parts.append(f"output cosine {worst.cosine:.5f} ({worst.name})")
        close = worst.cosine >= ADVISED_COSINE
    if labels:
        least = min(labels, key=_agreement)
        parts.append(f"{_agreement(least):.1%} of {least.name}'s values equal")
        close = close and _agreement(least) >= ADVISED_COSINE
    measured = f"{', '.join(parts)} against the input on {where}"
    if close:
        return f"quick check after {steps}: {measured}; {advice}"
    return f"warning: {steps} moved the outputs far from the input's: {measured}, below {ADVISED_COSINE:g}{follow}{closer}"


def hint_for_step(hint: str, options: Mapping[str, Any]) -> str:
    """A pass's ``fidelity_hint``, or "already ran with ..." when the step set every option the hint recommends.

    ``options`` are the step's resolved options (defaults filled in).
    quick_check then says why the result can still miss.
    """
    recommended = {key: parse_value(text) for key, text in _SETTING.findall(hint) if key in options}
    if not recommended or not all(_in_use(options[key], value) for key, value in recommended.items()):
        return hint
    return _ALREADY + ", ".join(f"{key}={_shown(options[key])}" for key in recommended)


def _in_use(value: Any, recommended: Any) -> bool:
    # A recommended bool must be set to it; a recommended number only stands for "set a target".
    if isinstance(recommended, bool):
        return value is recommended
    return value is not None and value is not False


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _integer_outputs(model: ir.Model) -> set[str]:
    return {value.name or "" for value in model.graph.outputs if value.dtype is not None and value.dtype.is_integer()}


def _agreement(result: ComparisonResult) -> float:
    """The share of an integer output's values that are the same in both models (violations are the others)."""
    return 1.0 - result.violations / result.elements if result.elements else 1.0


def _order(cosine: float) -> float:
    return -math.inf if math.isnan(cosine) else cosine
