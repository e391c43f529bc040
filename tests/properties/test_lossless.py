"""Property: every lossless pass keeps random valid graphs valid and their outputs equal.

For each registered pass that is not lossy (fold, each fold member, dce,
lift-constants, toposort) and each drawn graph (see strategies.py): the
rewritten model passes onnx.checker's full check, keeps its inputs and
outputs (names, element types, shapes), opens in onnxruntime with graph
optimizations off and on, and gives the original's outputs within the
lossless tolerances of shared/DESIGN.md (rtol 1e-5, atol 1e-6), with
optimizations on as well (unless onnxruntime's optimizers already fail on
the original: see outcomes.py).
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, run_ort
from hypothesis import event, given
from hypothesis import strategies as st
from properties.outcomes import assert_same_interface, assert_valid
from properties.strategies import ALL_KINDS, models

from graphopt import run_pipeline
from graphopt.registry import available_passes

pytestmark = pytest.mark.property

# A new lossy pass must be added here; otherwise it is held to the lossless contract and fails.
LOSSY = frozenset({"qdq", "prune", "lowrank"})
LOSSLESS = sorted(set(available_passes()) - LOSSY)
# Steps drawn more often for a pass, so that its patterns show up in most examples.
_FOCUS = {
    "cse": ("duplicate",),
    "collapse-reshapes": ("reshape", "flatten", "shape_reshape"),
    "dedup-initializers": ("conv", "matmul", "gemm"),
    "eliminate-noops": ("noop",),
    "fold-batchnorm": ("conv", "gemm", "matmul", "batchnorm"),
    "fold-constants": ("constant_expression", "shape_reshape"),
    "fold-elementwise": ("conv", "gemm", "matmul"),
    "fold-transposes": ("transpose", "matmul", "gemm"),
    "fuse-matmul-add": ("matmul", "matmul", "gemm", "flatten"),
}


def _kinds(name: str) -> tuple[str, ...]:
    return ALL_KINDS + _FOCUS.get(name, ()) * 3


def _rewrite(proto: onnx.ModelProto, pipeline: str) -> tuple[onnx.ModelProto, bool]:
    result = run_pipeline(ir.serde.deserialize_model(proto), pipeline)
    return ir.to_proto(result.model), result.modified


def _assert_lossless(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = run_ort(original, feeds)
    plain, optimized = assert_valid(original, rewritten, feeds)
    assert_same_interface(original, rewritten)
    assert_same_outputs(expected, plain)
    if optimized is not None:
        assert_same_outputs(expected, optimized)


@pytest.mark.parametrize("name", LOSSLESS)
@given(data=st.data())
def test_lossless_pass_keeps_random_graphs_valid_and_equal(name, data):
    drawn = data.draw(models(_kinds(name)), label="drawn")

    rewritten, modified = _rewrite(drawn.proto, name)

    event(f"modified={modified}")
    _assert_lossless(drawn.proto, rewritten, drawn.feeds)


@given(drawn=models())
def test_fold_reaches_a_fixed_point(drawn):
    model = ir.serde.deserialize_model(drawn.proto)
    run_pipeline(model, "fold")
    before = ir.to_proto(model).SerializeToString()

    again = run_pipeline(model, "fold")

    assert again.modified is False
    assert ir.to_proto(model).SerializeToString() == before


def _shuffled(graph: onnx.GraphProto, rng: random.Random) -> None:
    """Lists the nodes of the graph and of every body in a random order (in place)."""
    nodes = list(graph.node)
    rng.shuffle(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _shuffled(attr.g, rng)


@given(drawn=models(), seed=st.integers(0, 2**16))
def test_toposort_restores_shuffled_graphs(drawn, seed):
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(drawn.proto)
    _shuffled(shuffled.graph, random.Random(seed))

    rewritten, _ = _rewrite(shuffled, "toposort")

    _assert_lossless(drawn.proto, rewritten, drawn.feeds)
