"""The command line's exit-code promise over onnx's own backend node test cases.

``graphopt`` promises exit 0 (ok), 1 (``validate`` out of tolerance) or 2 with
one line ``graphopt: error: ...`` on stderr, never a traceback. This checks it
on real, valid single-op models of every op type: onnx's backend node cases,
generated in memory with ``collect_testcases`` as in
tests/passes/test_fold_backend_sweep.py (numpy's global RNG state saved and
restored around it, since the generators reseed it). Each case, saved to
tmp_path and run in-process through ``graphopt.cli.main``:

1. ``inspect`` and ``inspect --json``: exit 0.
2. ``optimize`` with the default pipeline and with ``--passes fold``: exit 0,
   or 2 with one line. A written result loads and, where onnxruntime runs the
   input on the case's inputs, gives the same outputs (lossless tolerances).
3. ``validate`` of the input against the ``fold`` result, on synthesized
   feeds and with ``--data`` (an .npz of the case's inputs): exit 0, identical
   models must pass; or 2 with one line (onnxruntime lacks a kernel, cannot
   feed or return the type, random feeds break the op...). Exit 1 is a bug.

Subset (deterministic, for the ~25 s budget on two shared cores): the first
case by name of each op type (the op of the case's single node, or its
name stem for ``_expanded`` function bodies, which are skipped), ~200 cases;
plus ``_REGRESSIONS``, cases that found bugs in the whole sweep (string and
sequence outputs in validate, bfloat16/float8 feeds and outputs, raw-byte
.npz arrays); and ``_KNOWN_PASS_BUGS``, strict xfails. Run with ``GRAPHOPT_SWEEP_ALL=1`` to sweep all ~1900 cases
(about 4 minutes on two cores), as was done when this file was written:
with onnx 1.23.2 and onnxruntime 1.32 every case then kept the promise.

Data files: string arrays are saved as numpy unicode (object arrays would
need pickle, which graphopt refuses), and ml_dtypes arrays (bfloat16, float8)
as raw bytes, as ``np.savez`` writes most of them anyway.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from helpers import LOSSLESS_ATOL, LOSSLESS_RTOL, run_ort

from graphopt.cli import main

_REGRESSIONS = (
    "test_string_concat",  # string outputs: metrics cast them to float64
    "test_split_to_sequence_1",  # sequence outputs: lists of arrays, not arrays
    "test_if_seq",
    "test_cast_FLOAT_to_BFLOAT16",  # bfloat16 outputs onnxruntime cannot return as arrays
    "test_cast_FLOAT8E5M2_to_FLOAT",  # float8 inputs onnxruntime cannot take as arrays
    "test_celu_bfloat16",
    "test_sequence_insert_at_back",  # sequence inputs were synthesized as tensors
    "test_cast_FLOAT_to_INT4",  # int4 outputs: a clear refusal
    "test_if_opt",  # fold made a SequenceConstruct in an If branch a tensor initializer
)


@functools.cache
def _all_cases() -> dict[str, object]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow/divide warnings
        state = np.random.get_state()  # the generators reseed numpy's global RNG
        try:
            cases = collect_testcases()
        finally:
            np.random.set_state(state)
    return {case.name: case for case in cases}


def _op_key(case) -> str:
    nodes = case.model.graph.node
    return nodes[0].op_type if len(nodes) == 1 else case.name.removeprefix("test_").split("_")[0]


def _selected() -> list[str]:
    cases = _all_cases()
    if os.environ.get("GRAPHOPT_SWEEP_ALL"):
        return sorted(cases)
    first: dict[str, str] = {}
    for name in sorted(cases):
        if "_expanded" not in name:
            first.setdefault(_op_key(cases[name]), name)
    return sorted(set(first.values()) | {name for name in _REGRESSIONS if name in cases})


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), (argv, captured.err)
    return code, captured.err


def _array(value) -> np.ndarray:
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _case_inputs(case) -> dict[str, np.ndarray] | None:
    """The first data set's inputs by graph input name; None when they are not plain tensors."""
    if not case.data_sets:
        return None
    inputs = case.data_sets[0][0]
    if len(inputs) != len(case.model.graph.input):
        return None
    if not all(isinstance(x, (np.ndarray, np.generic, onnx.TensorProto)) for x in inputs):
        return None
    return {vi.name: _array(x) for vi, x in zip(case.model.graph.input, inputs)}


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == object:
        return array.astype(str)
    if array.dtype.type.__module__.startswith("ml_dtypes"):
        return array.view(f"V{array.dtype.itemsize}")
    return array


def _ort_outputs(model: Path, feeds: dict[str, np.ndarray]) -> list | None:
    try:
        return run_ort(model, feeds)
    except Exception:  # onnxruntime cannot run or feed it: nothing to compare against
        return None


def _assert_same(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        if isinstance(want, np.ndarray) and want.dtype != object:
            assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=LOSSLESS_RTOL, atol=LOSSLESS_ATOL)
        else:  # strings, sequences, optionals
            assert repr(got) == repr(want)


# Known pass bugs, kept as strict xfails so a fix shows up (none open).
_KNOWN_PASS_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=_KNOWN_PASS_BUGS[name])) if name in _KNOWN_PASS_BUGS else name
        for name in sorted({*_selected(), *_KNOWN_PASS_BUGS, *_REGRESSIONS})
    ],
)
def test_cli_keeps_its_exit_code_promise_on_backend_node_case(name: str, tmp_path: Path, capsys):
    case = _all_cases()[name]
    model = tmp_path / "model.onnx"
    onnx.save(case.model, model)
    feeds = _case_inputs(case)

    assert _cli(capsys, "inspect", str(model))[0] == 0
    assert _cli(capsys, "inspect", "--json", str(model))[0] == 0

    reference = _ort_outputs(model, feeds) if feeds is not None else None
    written = []
    for label, extra in (("default", []), ("fold", ["--passes", "fold"])):
        out = tmp_path / f"{label}.onnx"
        code, _ = _cli(capsys, "optimize", str(model), "-o", str(out), *extra)
        if code == 0:
            onnx.load(out)
            written.append(out)
            if reference is not None:
                _assert_same(reference, run_ort(out, feeds))
    candidate = written[-1] if written else model

    _cli(capsys, "validate", str(model), str(candidate), "--samples", "2")
    if feeds is not None:
        data = tmp_path / "data.npz"
        np.savez(data, **{key: _storable(value) for key, value in feeds.items()})
        _cli(capsys, "validate", str(model), str(candidate), "--data", str(data))


def test_sweep_covers_every_op_type():
    # Guards against the subset silently shrinking, e.g. after an onnx upgrade.
    assert len(_selected()) >= 180
