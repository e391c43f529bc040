"""Pass bisection: replay a pipeline prefix by prefix to find the pass that breaks fidelity.

Lossy passes add error, and one pass usually breaks a tolerance on its own,
but error need not grow monotonically (a later pass can cancel an earlier
one's drift), so prefixes are checked in order rather than by binary search:
the answer is the first prefix that fails, at the cost of one pipeline run
and one validation per pass. Pipelines are a handful of passes long.
"""

from __future__ import annotations

__all__ = ["bisect_pipeline"]

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from graphopt import io
from graphopt.pipeline import run_pipeline
from graphopt.report import FidelityReport
from graphopt.spec import PassSpec

logger = logging.getLogger(__name__)


def bisect_pipeline(
    source: str | os.PathLike[str],
    steps: Sequence[PassSpec | ir.passes.PassBase],
    check: Callable[[ir.Model], FidelityReport],
) -> dict[str, Any]:
    """Returns ``{first_failing_pass, step, checked}``; the pass is None if every prefix passes.

    Args:
        source: The original model file; each prefix starts from a fresh load.
        steps: The pipeline's steps, as specs or pass instances.
        check: Validates a rewritten model against the original.
    """
    for count in range(1, len(steps) + 1):
        model = io.load(source)
        result = run_pipeline(model, list(steps[:count]))
        report = check(result.model)
        label = result.ledger.rows[-1].name
        logger.info("bisect: after %d pass(es), ending with %s: %s", count, label, "pass" if report.passed else "FAIL")
        if not report.passed:
            return {"first_failing_pass": label, "step": count, "checked": count}
    return {"first_failing_pass": None, "step": None, "checked": len(steps)}
