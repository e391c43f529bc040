"""The ``fold`` group over onnx's own backend node tests, run through onnxruntime.

onnx defines ~1900 single-operator test cases (``onnx.backend.test.case.node``:
a model, inputs and expected outputs). The wheel used here ships them as
Python code only, not as ``data/node/*/model.onnx`` + ``.pb`` files, so they
are generated in memory with ``collect_testcases`` (what onnx's own
``backend-test-tools generate-data`` writes to disk), once per session, ~6 s.

A case is swept when onnxruntime (CPU, ORT_DISABLE_ALL) runs it and matches
its expected outputs within the case's tolerance (rtol 1e-3, atol 1e-7 unless
the case sets its own, as onnx's backend runner does). The others are not
graphopt's business and are dropped at collection, not reported as skips;
``_COVERAGE`` counts them by reason and ``test_sweep_covers_most_node_cases``
guards the numbers. Each swept case gives up to two tests:

- ``as_given``: all operands are graph inputs. After ``fold`` the model still
  passes onnx.checker (full check, where the original passes it) and gives the
  original's outputs within the lossless tolerances.
- ``baked``: every graph input becomes an initializer holding the test data,
  and each graph output is read through an Identity, so the op's own outputs
  are plain values that constant folding must compute (fold-constants never
  folds a node that writes a graph output). After ``fold`` the outputs equal
  the original model's on the test data, and every node but those Identities
  is gone unless ``_left_by_design`` names why fold-constants keeps it.

Outputs of a type onnxruntime's Python API cannot return (bfloat16, float8,
int4, int2, float4) are read through ``Cast(to=FLOAT)`` instead of Identity in
both modes, which is exact for these types. Cases whose inputs have such a
type cannot be fed, so they run ``baked`` only, against onnxruntime's outputs
for the baked model before folding.

Excluded on purpose (``_EXCLUDED_OPS``): random ops and Dropout in training
mode, whose outputs change from run to run.

Coverage with onnx 1.23.2 and onnxruntime 1.32: of 1884 cases, 1715 are swept
(1591 as given, 1715 baked); dropped: 113 onnxruntime cannot run (no kernel
at that opset or dtype, preview training ops, optional inputs), 26 sequence or
optional data, 18 onnxruntime disagrees with onnx (DFT, STFT, some Resize and
Attention cases), 12 random. 76 baked cases keep a node by design (ai.onnx.ml,
If/Loop/Scan, Q/DQ, omitted optional outputs, strings, int4/int8 widening
Casts). IR version 3 cases fold too: run_pipeline first raises them to IR 4
(graphopt/upgrade_ir.py).

Run time: about 28 s for all ~3300 tests on two shared cores (9 s of it
generating and checking cases at collection; the 3-D pooling cases take 1 s
each in onnx's reference evaluator), under the ~40 s budget, so every case
runs and there is no subset.
"""

from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from helpers import LOSSLESS_ATOL, LOSSLESS_RTOL, assert_same_outputs, check_full, run_ort

import graphopt
from passes import BUILTIN_PASSES

# Ops whose outputs are random, so no two runs agree; each case using one is dropped.
_EXCLUDED_OPS = {
    "RandomNormal": "random samples",
    "RandomUniform": "random samples",
    "RandomNormalLike": "random samples",
    "RandomUniformLike": "random samples",
    "Multinomial": "random samples",
    "Bernoulli": "random samples",
}
# Dropout is random only in training mode: see _uses_random_dropout.

# float16 outputs are compared within 2 float16 ulps (2**-9 relative) instead of
# the lossless bound, which is below one float16 ulp (2**-10). The difference
# is onnxruntime's, not fold's: its CPU provider runs float16 ops that lack a
# float16 kernel in float32 behind inserted Casts, and then drops
# float32 -> float16 -> float32 Cast pairs (RemoveDuplicateCastTransformer, on
# even at ORT_DISABLE_ALL). So where the original computes a float16 value
# (e.g. Attention's scale, Cast(Sqrt(...)) to float16) onnxruntime keeps it
# unrounded in float32, while the folded model stores it as a float16 constant
# as ONNX specifies. Seen on Attention (and its function expansion),
# FlexAttention and CausalConvWithState float16 cases: 1 ulp apart through
# onnxruntime, bit-identical through onnx's ReferenceEvaluator. For the same
# reason the evaluator fold uses (which rounds once) and onnxruntime (which
# may round after every step) differ by an ulp on baked float16 Attention.
# The cause is the dtype, not one op, so the bound is keyed on the dtype.
_FLOAT16_RTOL = 2.0**-9
_FLOAT16_ATOL = 2.0**-14  # the smallest normal float16

# Element types onnxruntime's Python API can feed and return as numpy arrays.
_EXCHANGEABLE = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.STRING,
        onnx.TensorProto.BOOL,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
    }
)
# Kept as nodes by fold-constants, see passes/fold/constants.py's docstring.
_NEVER_FOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_NARROW_INTEGERS = frozenset(
    {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
)
_BOUNDARY_SUFFIX = "__sweep_value"

_COVERAGE: collections.Counter[str] = collections.Counter()

# Folding evaluates ops on data that legitimately gives NaN/inf (Log of 0,
# Softmax of an all -inf row, ...); numpy's RuntimeWarnings there are noise.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@dataclass(frozen=True)
class _Case:
    name: str
    model: onnx.ModelProto  # outputs of a non-exchangeable type read through Cast(to=FLOAT)
    baked: onnx.ModelProto | None  # inputs as initializers, outputs read through Identity/Cast
    feeds: dict[str, np.ndarray] | None  # None: an input type onnxruntime's Python API cannot feed
    reference: list[np.ndarray]  # onnxruntime's outputs for the case, before any pass


@functools.cache
def _cases() -> tuple[_Case, ...]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow/divide warnings
        state = np.random.get_state()  # the generators reseed numpy's global RNG
        generated = collect_testcases()
        np.random.set_state(state)
        cases = [case for case in map(_prepare, generated) if case is not None]
    return tuple(cases)


def _prepare(case) -> _Case | None:
    """The case ready to sweep, or None (counted in ``_COVERAGE`` by reason)."""
    model = case.model
    if not case.data_sets:
        return _drop("no test data")
    inputs, expected = case.data_sets[0]
    if not all(isinstance(x, (np.ndarray, np.generic, onnx.TensorProto)) for x in (*inputs, *expected)):
        return _drop("sequence or optional data")
    if len(inputs) != len(model.graph.input):
        return _drop("inputs do not match the graph inputs")
    ops = {node.op_type for node in _all_nodes(model)}
    if ops & _EXCLUDED_OPS.keys() or _uses_random_dropout(model, inputs):
        return _drop("random op")
    tensors = {vi.name: _as_tensor(x, vi.name) for vi, x in zip(model.graph.input, inputs)}
    readable = _readable_outputs(model)
    baked = _baked(model, tensors)
    exchangeable = all(vi.type.tensor_type.elem_type in _EXCHANGEABLE for vi in model.graph.input)
    feeds = {name: onnx.numpy_helper.to_array(t) for name, t in tensors.items()} if exchangeable else None
    try:
        reference = run_ort(readable, feeds) if feeds is not None else run_ort(baked, {}) if baked else None
    except Exception:  # onnxruntime's errors share no base class worth naming
        return _drop("onnxruntime cannot run it")
    if reference is None:
        return _drop("onnxruntime cannot feed its inputs and a graph output is an input")
    if not all(_close(want, got, case.rtol, case.atol) for want, got in zip(map(_array, expected), reference)):
        return _drop("onnxruntime disagrees with the expected outputs")
    _COVERAGE["swept"] += 1
    _COVERAGE["as_given"] += feeds is not None
    _COVERAGE["baked"] += baked is not None
    return _Case(case.name, readable, baked, feeds, reference)


def _drop(reason: str) -> None:
    _COVERAGE[f"dropped: {reason}"] += 1
    return None


def _all_nodes(model: onnx.ModelProto):
    """Nodes of the main graph, its subgraphs and the model's functions."""
    stack = [model.graph, *(function for function in model.functions)]
    while stack:
        for node in stack.pop().node:
            yield node
            for attr in node.attribute:
                stack.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)


def _uses_random_dropout(model: onnx.ModelProto, inputs) -> bool:
    """Dropout with a training_mode input that is not a constant False drops at random."""
    values = dict(zip((vi.name for vi in model.graph.input), inputs))
    for node in _all_nodes(model):
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            flag = values.get(node.input[2])
            if flag is None or bool(np.asarray(_array(flag)).reshape(-1)[0]):
                return True
    return False


def _as_tensor(value, name: str) -> onnx.TensorProto:
    if isinstance(value, onnx.TensorProto):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = name
        return tensor
    return onnx.numpy_helper.from_array(np.asarray(value), name)


def _array(value) -> np.ndarray:
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _readable_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, with each output onnxruntime cannot return read through an exact Cast(to=FLOAT)."""
    if all(vi.type.tensor_type.elem_type in _EXCHANGEABLE for vi in model.graph.output):
        return model
    return _with_boundary(model, only_unexchangeable=True)


def _with_boundary(model: onnx.ModelProto, *, only_unexchangeable: bool) -> onnx.ModelProto:
    """A copy whose graph outputs are written by Identity (or Cast(to=FLOAT)) nodes reading the old values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    renamed = {}
    for vi in graph.output:
        exchangeable = vi.type.tensor_type.elem_type in _EXCHANGEABLE
        if not (only_unexchangeable and exchangeable):
            renamed[vi.name] = vi.name + _BOUNDARY_SUFFIX
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for vi in graph.output:
        if vi.name not in renamed:
            continue
        if vi.type.tensor_type.elem_type in _EXCHANGEABLE:
            graph.node.append(onnx.helper.make_node("Identity", [renamed[vi.name]], [vi.name]))
        else:
            graph.node.append(onnx.helper.make_node("Cast", [renamed[vi.name]], [vi.name], to=onnx.TensorProto.FLOAT))
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return copy


def _baked(model: onnx.ModelProto, tensors: dict[str, onnx.TensorProto]) -> onnx.ModelProto | None:
    """``model`` with every graph input an initializer holding the test data; None if an output is an input."""
    produced = {name for node in model.graph.node for name in node.output}
    if not all(vi.name in produced for vi in model.graph.output):
        return None
    baked = _with_boundary(model, only_unexchangeable=False)
    del baked.graph.input[:]
    baked.graph.initializer.extend(tensors.values())
    return baked


def _close(want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> bool:
    if want.shape != got.shape:
        return False
    if want.dtype == object or got.dtype == object:
        return bool(np.array_equal(want.astype(str), got.astype(str)))
    try:
        np.testing.assert_allclose(got, np.asarray(want, dtype=got.dtype), rtol=rtol, atol=atol)
    except (AssertionError, TypeError, ValueError):
        return False
    return True


def _assert_lossless(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        if want.dtype == object:
            assert got.dtype == object and got.shape == want.shape and np.array_equal(got, want)
        elif want.dtype == np.float16:
            assert_same_outputs([want], [got], rtol=_FLOAT16_RTOL, atol=_FLOAT16_ATOL)
        else:
            assert_same_outputs([want], [got], rtol=LOSSLESS_RTOL, atol=LOSSLESS_ATOL)


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def _left_by_design(model: onnx.ModelProto) -> str | None:
    """Why fold-constants keeps some node of the baked model (see passes/fold/constants.py), or None."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.input, *model.graph.output)}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            return "custom domain"
        if node.op_type in _NEVER_FOLDED:
            return "quantization op"
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            return "op with a body"
        if "" in node.output:
            return "omitted optional output"
        if any(types.get(name) == onnx.TensorProto.STRING for name in (*node.input, *node.output)):
            return "string tensor"
        if node.op_type in ("Cast", "CastLike") and types.get(node.input[0]) in _NARROW_INTEGERS:
            return "widens stored integers"
    return None


def _run_fold(model) -> None:
    # The built-in table, not graphopt's default lookup: that scans installed
    # packages' entry points on every call (~3 ms), a third of a case's time.
    graphopt.run_pipeline(model, "fold", passes=BUILTIN_PASSES)


_ALL = _cases()


@pytest.mark.parametrize("case", [c for c in _ALL if c.feeds is not None], ids=lambda c: c.name)
def test_fold_keeps_outputs_when_operands_are_graph_inputs(case: _Case):
    model = graphopt.load(case.model)

    _run_fold(model)

    if _passes_checker(case.model):
        check_full(model)
    _assert_lossless(case.reference, run_ort(model, case.feeds))


@pytest.mark.parametrize("case", [c for c in _ALL if c.baked is not None], ids=lambda c: c.name)
def test_fold_computes_the_op_when_operands_are_baked_in(case: _Case):
    assert case.baked is not None
    model = graphopt.load(case.baked)

    _run_fold(model)

    if _left_by_design(case.model) is None:
        # The op itself was evaluated: only boundary nodes reading initializers are left.
        left = [node.op_type for node in model.graph]
        assert set(left) <= {"Identity", "Cast"} and len(left) == len(model.graph.outputs), left
        # Outputs that fold to equal tensors may share one (dedup and cse merge them).
        assert all(node.inputs[0].is_initializer() or node.inputs[0].is_graph_output() for node in model.graph)
    if _passes_checker(case.baked):
        check_full(model)
    _assert_lossless(case.reference, run_ort(model, {}))


def test_sweep_covers_most_node_cases():
    # Guards against the sweep silently emptying, e.g. when an onnx or
    # onnxruntime upgrade changes how cases are generated or run.
    # Measured with onnx 1.23.2 and onnxruntime 1.32: see the module docstring.
    assert _COVERAGE["swept"] >= 1500, dict(_COVERAGE)
    assert _COVERAGE["as_given"] >= 1400 and _COVERAGE["baked"] >= 1500, dict(_COVERAGE)
