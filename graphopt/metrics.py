"""Compare a reference output with a candidate output, one sample at a time.

:class:`OutputComparator` keeps running sums, never the samples, so the
statistics over many samples cost the memory of one. All arithmetic is in
float64 on the flattened arrays (integer and bool outputs are cast too), over
all samples together:

- ``max_abs = max|c - r|``, ``mean_abs = mean|c - r|``;
- ``rel_l2 = ||c - r|| / ||r||`` (0 when ``c == r``; inf when ``||r|| = 0 != ||c - r||``);
- ``cosine = <r, c> / (||r|| ||c||)`` (1 when both are all zero, 0 when exactly one is);
- ``snr_db = 10 log10(||r||^2 / ||c - r||^2)`` (inf when ``c == r``, -inf when ``r`` is
  all zero and ``c`` is not);
- ``violations``: elements with ``|c - r| > atol + rtol * |r|`` (numpy's isclose rule),
  counted only when the tolerance uses atol or rtol. A comparator made with
  ``peak_relative=True`` (per-layer localization) uses ``rtol * max|r|`` of the
  sample instead (in the default mode, a failure whose violations all lie within
  that looser bound says so): an intermediate tensor's elements near zero come from sums
  whose rounding scales with their terms, not with the result (a lossless BatchNorm
  fold of resnet50 gave 37 conv/add outputs with elementwise misses at rel L2 <= 4e-5).

NaN and Inf: positions where both sides are NaN, or both the same infinity,
agree; they are left out of the statistics above (``elements`` still counts
them). Any other position with a NaN or Inf on either side is a mismatch: it
stays in the statistics (which then read nan or inf) and fails the comparison.

Nothing compared: when the shapes differ (in any sample), or every sample's
output is empty (a zero-sized dim, an empty sequence or optional) or NaN/Inf
at the same positions in both models (no finite value), ``elements`` is 0, the statistics above are NaN (never the 0 / 1 / inf of a perfect match)
and ``top1``/``top5`` are None. Differing shapes fail. Empty outputs of equal
shapes do not fail here: some are empty by construction (the state output of
a kernel-size-1 CausalConvWithState, Resize's empty ``roi``), and the models
agree on them; the caller decides whether any evidence was gathered at all
(``graphopt.validate`` refuses when every output was empty).

Integer and bool outputs (class indices, counts, masks) also get ``equal_share``,
the share of elements equal in both models. Under ``min_cosine`` or
``min_snr_db`` they are judged by it instead of by cosine or SNR, which say
nothing about indices (every label swapped with a neighbour kept a cosine of
0.986): they need ``equal_share >= min_cosine`` and ``>= 1 - 10^(-min_snr_db/10)``.
The atol/rtol rule applies to them as to any output.

Classifier-shaped outputs, float ``(N, C)`` or ``(N, C, 1, 1)`` with ``C >= 2``
in every sample, also get ``top1`` (fraction of rows whose argmax agrees) and,
when ``C >= 5``, ``top5`` (fraction of rows whose reference argmax is among the
candidate's five largest).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "Tolerance",
    "ComparisonResult",
    "OutputComparator",
    "compare_arrays",
    "class_score_shape",
    "cosine_of_sums",
    "snr_of_sums",
    "output_arrays",
    "json_float",
]

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# onnxruntime's graph optimizations fuse and reorder float math, so two
# correct float32 models rarely agree bit for bit; lossless passes are held to
# the tighter 1e-6 / 1e-5 in their own tests.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# A relative L2 error float32 rounding stays below (reordered sums of thousands of terms
# land near 1e-7..1e-6); above it a failure is not hinted to be rounding.
_ROUNDING_REL_L2 = 1e-5


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one output; every criterion that is set must hold.

    With all four left as None, the default applies: ``atol=1e-4, rtol=1e-3``
    (:data:`DEFAULT_ATOL`, :data:`DEFAULT_RTOL`). It is not bit-exactness
    because onnxruntime's graph optimizations reorder float math; the
    lossless passes are tested at ``atol=1e-6, rtol=1e-5``. Setting only one
    of atol and rtol makes the other 0.

    Attributes:
        atol: Absolute tolerance of ``|c - r| <= atol + rtol * |r|``.
        rtol: Relative tolerance of the same rule.
        min_cosine: Lowest accepted cosine similarity, in [-1, 1].
        min_snr_db: Lowest accepted signal-to-noise ratio in dB, >= 0.

    Raises:
        ValueError: A value is NaN or negative, or min_cosine is outside [-1, 1].
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None

    def __post_init__(self) -> None:
        if all(v is None for v in (self.atol, self.rtol, self.min_cosine, self.min_snr_db)):
            object.__setattr__(self, "atol", DEFAULT_ATOL)
            object.__setattr__(self, "rtol", DEFAULT_RTOL)
        for label, value in (("atol", self.atol), ("rtol", self.rtol), ("min_snr_db", self.min_snr_db)):
            if value is not None and not value >= 0:  # also rejects NaN
                raise ValueError(f"{label} must be a number >= 0, got {value}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}")

    @property
    def uses_allclose(self) -> bool:
        """Whether the elementwise ``atol + rtol * |r|`` rule is in use."""
        return self.atol is not None or self.rtol is not None

    def describe(self) -> str:
        """One line such as ``"atol=0.0001, rtol=0.001"`` or ``"cosine >= 0.99"``."""
        parts = []
        if self.atol is not None:
            parts.append(f"atol={_threshold(self.atol)}")
        if self.rtol is not None:
            parts.append(f"rtol={_threshold(self.rtol)}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {_threshold(self.min_cosine)}")
        if self.min_snr_db is not None:
            parts.append(f"SNR >= {_threshold(self.min_snr_db)} dB")
        return ", ".join(parts)


@dataclass
class ComparisonResult:
    """Statistics of one output over all samples, and the verdict (see the module docstring)."""

    name: str
    samples: int
    elements: int
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    snr_db: float
    nan_reference: int
    inf_reference: int
    nan_candidate: int
    inf_candidate: int
    violations: int
    top1: float | None
    top5: float | None
    passed: bool
    reason: str
    # Integer and bool outputs (class indices, counts, masks): the share of elements equal in both models.
    equal_share: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def compared(self) -> bool:
        """Whether any element was compared; when not, the statistics are NaN."""
        return self.elements > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return {key: json_float(value) for key, value in dataclasses.asdict(self).items()}


class OutputComparator:
    """Accumulates one output's statistics across samples without keeping the samples."""

    def __init__(self, name: str, tolerance: Tolerance, *, peak_relative: bool = False) -> None:
        """``peak_relative``: the rtol term scales with the sample's largest ``|r|`` (see the module docstring)."""
        self.name = name
        self.tolerance = tolerance
        self.peak_relative = peak_relative
        self._peak = 0.0  # largest |r| of a sample that had violations, for the reason text
        self._beyond_peak = 0  # elementwise mode: violations that rtol of the peak would not excuse either
        self._samples = 0
        self._elements = 0
        self._counted = 0  # positions that enter the numeric statistics
        self._max_abs = 0.0
        self._sums = np.zeros(5)  # |d|, r.r, c.c, r.c, d.d
        self._violations = 0
        self._nonfinite = np.zeros(4, dtype=np.int64)  # nan ref, inf ref, nan cand, inf cand
        self._candidate_only = {"NaN": 0, "Inf": 0}
        self._reference_only = 0
        self._agreeing = 0  # positions NaN, or the same infinity, on both sides
        self._shape_error = ""
        self._rows = 0
        self._top1_hits = 0
        self._top5_hits: int | None = 0
        self._classifier = True
        self._unequal = 0  # non-numeric (string) elements that differ
        self._integer = True  # every sample so far integer or bool on both sides
        self._equal = 0  # integer outputs: elements equal in both models

    def update(self, reference: Any, candidate: Any) -> None:
        """Adds one sample's pair of outputs to the running statistics.

        An output is what onnxruntime returns: a tensor, or a sequence (list),
        map (dict) or empty optional (None) of them; see :func:`output_arrays`.
        """
        self._samples += 1
        if isinstance(reference, np.ndarray) and isinstance(candidate, np.ndarray):
            self._update_tensor(reference, candidate)
            return
        # Sequence outputs (e.g. SplitToSequence) come back as lists, whose elements
        # may differ in shape: np.asarray raised on them. Compared element by element.
        self._classifier = False
        refs, cands = output_arrays(reference), output_arrays(candidate)
        if len(refs) != len(cands):
            if not self._shape_error:
                self._shape_error = f"{_elements(len(cands))} in the sequence != reference {len(refs)}"
            return
        for ref, cand in zip(refs, cands):
            self._update_tensor(ref, cand)

    def _update_tensor(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            self._classifier = False
            if not self._shape_error:
                self._shape_error = f"shape {_shape(candidate.shape)} != reference {_shape(reference.shape)}"
            return
        if not (_numeric(reference) and _numeric(candidate)):
            # String outputs cannot go through float64 (astype raised): they must match exactly.
            self._classifier = False
            self._elements += reference.size
            self._unequal += int(np.count_nonzero(reference.astype(str) != candidate.astype(str)))
            return
        self._update_classification(reference, candidate)
        if reference.dtype.kind in "iub" and candidate.dtype.kind in "iub":
            self._equal += int(np.count_nonzero(reference == candidate))
        else:
            self._integer = False
        ref = reference.astype(np.float64, copy=False).ravel()
        cand = candidate.astype(np.float64, copy=False).ravel()
        self._elements += ref.size
        with np.errstate(invalid="ignore", over="ignore"):
            squares = (float(ref @ ref), float(cand @ cand))
        # Finite sums of squares mean finite arrays (float32 values cannot
        # overflow them in float64): two passes fewer than testing each element.
        if not (math.isfinite(squares[0]) and math.isfinite(squares[1])):
            ref, cand = self._split_nonfinite(ref, cand)
            squares = None
        self._accumulate(ref, cand, squares)

    @property
    def nothing_compared(self) -> bool:
        """Whether no value was compared: every sample so far gave outputs of the same shape that were
        empty, or NaN/Inf at the same positions on both sides (no finite value to measure)."""
        return self._samples > 0 and not self._shape_error and self._counted == 0 and self._elements == self._agreeing

    def result(self) -> ComparisonResult:
        """The statistics and verdict so far; the comparator can keep accumulating."""
        abs_sum, rr, cc, rc, dd = (float(v) for v in self._sums)
        integer = self._integer and self._elements > 0 and not self._unequal
        equal_share = self._equal / self._elements if integer else None
        failures = self._failures(cosine_of_sums(rr, cc, rc), snr_of_sums(rr, dd), _rel_l2(rr, dd), equal_share)
        nan_ref, inf_ref, nan_cand, inf_cand = (int(v) for v in self._nonfinite)
        # Differing shapes void the comparison: what matched in other samples is no evidence either;
        # outputs all NaN/Inf in both models hold no finite value to measure (cosine 1 would vouch for them).
        elements = 0 if self._shape_error or self.nothing_compared else self._elements
        statistics = (
            self._max_abs,
            abs_sum / self._counted if self._counted else 0.0,
            _rel_l2(rr, dd),
            cosine_of_sums(rr, cc, rc),
            snr_of_sums(rr, dd),
        )
        if elements == 0:  # no match at all: NaN, not the 0 / 1 / inf that read as a perfect one
            statistics = (math.nan,) * len(statistics)
        max_abs, mean_abs, rel_l2, cosine, snr_db = statistics
        rows = self._rows if self._classifier else 0
        return ComparisonResult(
            name=self.name,
            samples=self._samples,
            elements=elements,
            max_abs=max_abs,
            mean_abs=mean_abs,
            rel_l2=rel_l2,
            cosine=cosine,
            snr_db=snr_db,
            nan_reference=nan_ref,
            inf_reference=inf_ref,
            nan_candidate=nan_cand,
            inf_candidate=inf_cand,
            violations=self._violations,
            top1=self._top1_hits / rows if rows else None,
            top5=self._top5_hits / rows if rows and self._top5_hits is not None else None,
            passed=not failures,
            reason="; ".join(failures),
            equal_share=None if elements == 0 else equal_share,
        )

    def _split_nonfinite(self, ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts NaN/Inf per side and returns the positions that are not agreeing non-finite pairs."""
        ref_nan, cand_nan = np.isnan(ref), np.isnan(cand)
        ref_inf, cand_inf = np.isinf(ref), np.isinf(cand)
        self._nonfinite += [ref_nan.sum(), ref_inf.sum(), cand_nan.sum(), cand_inf.sum()]
        agree = (ref_nan & cand_nan) | (ref_inf & (ref == cand))
        self._agreeing += int(agree.sum())
        self._candidate_only["NaN"] += int((cand_nan & ~ref_nan).sum())
        self._candidate_only["Inf"] += int((cand_inf & ~agree).sum())
        self._reference_only += int((~np.isfinite(ref) & np.isfinite(cand)).sum())
        keep = ~agree
        return ref[keep], cand[keep]

    def _accumulate(self, ref: np.ndarray, cand: np.ndarray, squares: tuple[float, float] | None = None) -> None:
        """Adds finite-or-agreeing positions; ``squares`` is (ref.ref, cand.cand) when already known."""
        if ref.size == 0:
            return
        with np.errstate(invalid="ignore", over="ignore"):
            diff = cand - ref
            abs_diff = np.abs(diff)
            sample_max = abs_diff.max()
            self._max_abs = float(np.maximum(self._max_abs, sample_max))  # np.maximum keeps NaN
            rr, cc = squares if squares is not None else (ref @ ref, cand @ cand)
            self._sums += [abs_diff.sum(), rr, cc, ref @ cand, diff @ diff]
            atol, rtol = self.tolerance.atol or 0.0, self.tolerance.rtol or 0.0
            # Every difference within atol is within atol + rtol*|ref|: skip the per-element bound.
            if self.tolerance.uses_allclose and not sample_max <= atol:
                peak = float(np.abs(ref).max())
                beyond_peak = int(np.count_nonzero(~(abs_diff <= atol + rtol * peak)))  # NaN counts as a violation
                if self.peak_relative:
                    violations = beyond_peak
                else:
                    violations = int(np.count_nonzero(~(abs_diff <= atol + rtol * np.abs(ref))))
                    self._beyond_peak += beyond_peak
                self._peak = max(self._peak, peak) if violations else self._peak
                self._violations += violations
        self._counted += ref.size

    def _update_classification(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        shape = reference.shape
        if reference.dtype.kind != "f" or not class_score_shape(shape):
            self._classifier = False
            return
        ref = reference.reshape(shape[0], shape[1])
        cand = candidate.reshape(shape[0], shape[1])
        expected = ref.argmax(axis=1)
        self._rows += shape[0]
        self._top1_hits += int((cand.argmax(axis=1) == expected).sum())
        if shape[1] < 5 or self._top5_hits is None:
            self._top5_hits = None
            return
        top5 = np.argpartition(-cand, 4, axis=1)[:, :5]
        self._top5_hits += int((top5 == expected[:, None]).any(axis=1).sum())

    def _failures(self, cosine: float, snr_db: float, rel_l2: float, equal_share: float | None) -> list[str]:
        if self._samples == 0:
            return ["no samples compared"]
        if self._shape_error:
            return [self._shape_error]
        if self._elements == 0:  # empty on both sides: the models agree, and the statistics are NaN (see the module docstring)
            return []
        failures = [f"{kind} in candidate only ({_elements(n)})" for kind, n in self._candidate_only.items() if n]
        if self._unequal:
            failures.append(f"{_elements(self._unequal)} of a string output differ")
        if self._reference_only:
            failures.append(f"NaN/Inf in reference only ({_elements(self._reference_only)})")
        if failures:  # the statistics below read nan or inf then; they would only repeat the cause
            return failures
        tol = self.tolerance
        if tol.uses_allclose and self._violations:
            limits = ", ".join(f"{k}={_threshold(v)}" for k, v in (("atol", tol.atol), ("rtol", tol.rtol)) if v is not None)
            if self.peak_relative and tol.rtol:
                limits += f" of the peak |value| {self._peak:.3g}"
            failures.append(f"{_elements(self._violations)} beyond {limits} (max abs {self._max_abs:.3g})")
            if not self.peak_relative and tol.rtol and not self._beyond_peak and rel_l2 <= _ROUNDING_REL_L2:
                # Worth saying: a lossless rewrite fails this way (reordered float sums near zero).
                failures[-1] += f", all within rtol of the peak |value| {self._peak:.3g}: float rounding near zero?"
        if equal_share is not None:
            # Class indices that all moved by one keep a cosine near 1: integer outputs
            # are judged by how many values agree (see the module docstring).
            required = _required_agreement(tol)
            if required is not None and not equal_share >= required:
                failures.append(f"{equal_share:.1%} of values equal < {required:.4g} required (integer output)")
            return failures
        if tol.min_cosine is not None and not cosine >= tol.min_cosine:
            failures.append(f"cosine {_below(cosine, tol.min_cosine)}")
        if tol.min_snr_db is not None and not snr_db >= tol.min_snr_db:
            failures.append(f"SNR {_below(snr_db, tol.min_snr_db)} dB")
        return failures


def _required_agreement(tolerance: Tolerance) -> float | None:
    """The share of equal values an integer output needs under a cosine or SNR tolerance.

    ``min_cosine`` is read as that share; ``min_snr_db`` as a mismatch rate of
    ``10^(-snr/10)`` (20 dB: 1% may differ). Both set: the stricter.
    """
    shares = []
    if tolerance.min_cosine is not None:
        shares.append(tolerance.min_cosine)
    if tolerance.min_snr_db is not None:
        shares.append(1.0 - 10.0 ** (-tolerance.min_snr_db / 10.0))
    return max(shares) if shares else None


def class_score_shape(shape: Sequence[int | None]) -> bool:
    """Whether a float output of ``shape`` can hold class scores: ``[N, C]`` or ``[N, C, 1, 1]`` with C >= 2.

    The one rule for top-1/top-5 here, task metrics (graphopt.task) and the
    CLI's look at declared outputs, where a None dim (unknown) may be anything.
    """
    if len(shape) not in (2, 4) or any(dim not in (1, None) for dim in shape[2:]):
        return False
    return shape[1] is None or shape[1] >= 2


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> ComparisonResult:
    """Compares one pair of arrays: a comparator fed with a single sample."""
    comparator = OutputComparator(name, tolerance)
    comparator.update(reference, candidate)
    return comparator.result()


def output_arrays(value: Any) -> list[np.ndarray]:
    """The tensors of one output as onnxruntime returns it, in a stable order.

    A tensor is itself; a sequence (list) gives its elements; a map (dict)
    gives its sorted keys, then its values; an empty optional (None) gives none.
    """
    if value is None:
        return []
    if isinstance(value, dict):
        keys = sorted(value)
        return [np.asarray(keys), *(array for key in keys for array in output_arrays(value[key]))]
    if isinstance(value, (list, tuple)):
        return [array for item in value for array in output_arrays(item)]
    return [np.asarray(value)]


def _numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "biufc" or array.dtype.kind == "V"  # V: ml_dtypes (bfloat16, float8, int4)


def _rel_l2(rr: float, dd: float) -> float:
    if dd == 0.0:
        return 0.0
    if rr == 0.0:
        return math.inf
    return math.sqrt(dd) / math.sqrt(rr)


def cosine_of_sums(rr: float, cc: float, rc: float) -> float:
    """Cosine from the sums r.r, c.c and r.c: 1 when both are zero, 0 when one is, clipped to [-1, 1]."""
    if rr == 0.0 and cc == 0.0:
        return 1.0
    if rr == 0.0 or cc == 0.0:
        return 0.0
    with np.errstate(invalid="ignore"):
        value = float(np.float64(rc) / (np.sqrt(rr) * np.sqrt(cc)))
    return value if math.isnan(value) else min(1.0, max(-1.0, value))  # rounding can step past +-1


def snr_of_sums(rr: float, dd: float) -> float:
    """SNR in dB from the sums r.r and d.d (d = c - r): inf when d is zero, -inf when r is, NaN from NaN."""
    if math.isnan(rr) or math.isnan(dd):
        return math.nan
    if dd == 0.0:
        return math.inf
    if rr == 0.0:
        return -math.inf
    return 10.0 * math.log10(rr / dd)


def _below(value: float, threshold: float) -> str:
    """``"value < threshold"`` with enough digits that the two never print alike."""
    for digits in range(3, 18):
        shown = f"{value:.{digits}g}"
        if shown != f"{threshold:.{digits}g}":
            break
    return f"{shown} < {_threshold(threshold)}"


def _threshold(value: float) -> str:
    """A user's threshold as given: ``0.99999999`` must not print as ``1`` (``:g`` keeps 6 digits)."""
    shown = f"{value:g}"
    return shown if float(shown) == value else repr(float(value))


def _elements(count: int) -> str:
    return f"{count} element" if count == 1 else f"{count} elements"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def json_float(value: Any) -> Any:
    """``value``, or for a non-finite float the string ``"inf"``, ``"-inf"`` or ``"nan"``: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
