"""How close a changed model's outputs stay to the original's on held-back samples, and a lower bound on it.

Passes with a fidelity target (lowrank's and qdq's ``target_cosine`` and
``target_snr``) keep the strongest compression whose fidelity on held-back
samples meets the target, so the fidelity they end at is selected to sit
just above the target: on samples they never saw, models land lower.
Measured on all-MiniLM-L6-v2 with lowrank at target cosine 0.98: held back
0.9804, unseen sentences 0.9788. The bound, the figure less two standard
errors of its per-sample values, leaves room for that: judged by it, the
same model ends at held back 0.9826, bound 0.9808, unseen 0.9810.
"""

from __future__ import annotations

__all__ = ["Judgement", "NOT_MEASURED", "ONE_SAMPLE", "judge", "reference_outputs", "meets"]

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from graphopt.metrics import cosine_of_sums, snr_of_sums
from graphopt.runtime import ModelRunner

# How summaries word a figure that could not be measured, and a bound without a spread.
NOT_MEASURED = "not measured (no finite value in the original's outputs to compare)"
ONE_SAMPLE = "one held-back sample: no spread estimate"
_SPREAD_ERRORS = 2.0  # standard errors below the figure: about a one-sided 97.5% bound
# Per-sample SNR of an exact sample is infinite; its spread is taken at this
# finite stand-in, beyond what float32 outputs that differ at all can reach.
_EXACT_SNR_DB = 200.0


@dataclass(frozen=True)
class Judgement:
    """Worst output's cosine and SNR over all samples together, and each less its per-sample spread.

    NaN when nothing was measured: no sample had a finite reference value
    (zero-size outputs, or a reference all NaN/Inf). ``samples``: how many
    samples were compared; with one there is no spread to allow for.
    """

    cosine: float
    lower_bound: float
    snr_db: float = math.inf
    snr_lower_bound: float = math.inf
    samples: int = 0

    @property
    def measured(self) -> bool:
        return not math.isnan(self.cosine)


def judge(
    model: ir.Model,
    samples: Sequence[Feeds],
    expected: Sequence[dict[str, np.ndarray]],
    threads: int | None,
    runner: ModelRunner | None = None,
) -> Judgement:
    """Runs ``model`` on ``samples`` and compares its numeric outputs with ``expected`` (the original's, in order).

    ``runner``: an open session on ``model`` to use (left open), so a caller
    that also times the model opens it once; None opens one here.
    NaN or infinite outputs count as cosine -1 and SNR -inf: as far from the
    original as outputs get. Positions where the reference itself is NaN or
    infinite are left out: the change did not cause them.
    """
    sums: dict[str, np.ndarray] = {}  # per output: sum of a.b, a.a, b.b, d.d over the samples (d = b - a)
    cosines, snrs = [], []
    with contextlib.nullcontext(runner) if runner is not None else ModelRunner(model, threads=threads) as runner:
        for feeds, reference in zip(samples, expected):
            got = runner.run(runner.own(feeds))
            worst_cosine, worst_snr, compared = 1.0, math.inf, False
            for name, want in reference.items():
                if not _numeric(want) or not _numeric(got[name]):
                    continue  # strings and sequences: no cosine
                a, b = (np.asarray(x, np.float64).ravel() for x in (want, got[name]))
                kept = np.isfinite(a)
                a, b = a[kept], b[kept]
                if not a.size:
                    continue
                compared = True
                with np.errstate(invalid="ignore", over="ignore"):
                    products = np.array([a @ b, a @ a, b @ b, (b - a) @ (b - a)])
                sums[name] = sums.get(name, 0.0) + products
                worst_cosine, worst_snr = min(worst_cosine, _cosine(products)), min(worst_snr, _snr(products))
            if compared:
                cosines.append(worst_cosine)
                snrs.append(worst_snr)
    cosine = min((_cosine(products) for products in sums.values()), default=math.nan)
    snr = min((_snr(products) for products in sums.values()), default=math.nan)
    finite_snrs = [min(value, _EXACT_SNR_DB) for value in snrs]
    snr_bound = snr - _spread(finite_snrs) if math.isfinite(snr) else snr
    return Judgement(cosine, cosine - _spread(cosines), snr, snr_bound, samples=len(cosines))


def meets(judgement: Judgement, target_cosine: float | None, target_snr: float | None = None) -> bool:
    """Whether the lower bounds reach the targets (None: no target); a figure not measured (NaN) reaches none."""
    if not judgement.measured:
        return target_cosine is None and target_snr is None
    cosine_ok = target_cosine is None or judgement.lower_bound >= target_cosine
    return cosine_ok and (target_snr is None or judgement.snr_lower_bound >= target_snr)


def reference_outputs(model: ir.Model, samples: Sequence[Feeds], threads: int | None) -> list[dict[str, np.ndarray]]:
    """The model's outputs on each sample: what :func:`judge` compares a changed copy with."""
    with ModelRunner(model, threads=threads) as runner:
        return [runner.run(runner.own(feeds)) for feeds in samples]


def _spread(values: list[float]) -> float:
    """Two standard errors of the mean of ``values``; 0 for a single value."""
    if len(values) < 2:
        return 0.0
    return _SPREAD_ERRORS * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def _numeric(array: object) -> bool:
    return isinstance(array, np.ndarray) and array.dtype.kind in "fiub"


def _cosine(products: np.ndarray) -> float:
    dot, aa, bb, _ = (float(x) for x in products)
    if not all(math.isfinite(x) for x in (dot, aa, bb)):
        return -1.0
    return cosine_of_sums(aa, bb, dot)


def _snr(products: np.ndarray) -> float:
    _, aa, _, dd = (float(x) for x in products)
    if not (math.isfinite(aa) and math.isfinite(dd)):
        return -math.inf
    return snr_of_sums(aa, dd)
