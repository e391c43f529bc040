"""Byte-level mutation of valid model files: load, inspect and fold either succeed or raise a GraphoptError.

Four seed models are written once per module: MatMul+Add, Conv+BatchNormalization,
MatMul with external data, and an If whose branches read outer values. Each
example copies one into a fresh folder, flips bytes or truncates one of its
files, then runs what ``graphopt inspect`` and ``graphopt optimize`` run
(--hypothesis-show-statistics shows the mix of outcomes).
Any exception that is not a ``graphopt.errors.GraphoptError`` is a bug.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_ort
from hypothesis import event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import graphopt
from graphopt import io
from graphopt.errors import GraphoptError
from graphopt.summary import summarize

pytestmark = [
    pytest.mark.property,
    # onnx_ir warns about each external data key a flip garbles; that is expected here.
    pytest.mark.filterwarnings("ignore:Ignoring unknown external data key"),
]

RNG = np.random.default_rng(11)
# Bounded for a slow shared machine: a few seconds per test. derandomize makes the
# examples the same on every run (seeded by the test's name), so CI is reproducible.
MUTATION_SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, database=None)


def _tensor(name: str, *shape: int) -> TensorProto:
    return onnx.numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _vi(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _matmul_add() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [_tensor("W", 4, 3), _tensor("b", 3)])


def _conv_bn() -> onnx.ModelProto:
    scale = onnx.numpy_helper.from_array(RNG.uniform(0.5, 1.5, 4).astype(np.float32), "scale")
    var = onnx.numpy_helper.from_array(RNG.uniform(0.5, 1.5, 4).astype(np.float32), "var")
    nodes = [
        helper.make_node("Conv", ["x", "K", "kb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
    ]
    weights = [_tensor("K", 4, 2, 3, 3), _tensor("kb", 4), scale, _tensor("bias", 4), _tensor("mean", 4), var]
    return _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", [1, 4, 5, 5])], weights)


def _if_subgraph() -> onnx.ModelProto:
    """y = If(cond) then x @ W (W a Constant in the branch) else Relu(x + b)."""
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=_tensor("Wv", 4, 4)),
            helper.make_node("MatMul", ["x", "W"], ["t"]),
        ],
        "then",
        [],
        [_vi("t", [2, 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Relu", ["s"], ["e"])],
        "else",
        [],
        [_vi("e", [2, 4])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    return _model(nodes, [_vi("cond", [], TensorProto.BOOL), _vi("x", [2, 4])], [_vi("y", [2, 4])], [_tensor("b", 4)])


SEEDS: dict[str, tuple[Callable[[], onnx.ModelProto], bool]] = {
    "matmul-add": (_matmul_add, False),
    "conv-bn": (_conv_bn, False),
    "external": (_matmul_add, True),
    "if-subgraph": (_if_subgraph, False),
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Folders each holding in.onnx (and in.onnx.data for the external seed)."""
    folders = {}
    for name, (build, external) in SEEDS.items():
        folder = tmp_path_factory.mktemp(name)
        onnx.save_model(
            build(), folder / "in.onnx", save_as_external_data=external, location="in.onnx.data", size_threshold=0
        )
        folders[name] = folder
    return folders


def test_seed_models_are_valid_and_survive_the_full_run(seeds):
    # The mutation tests below mean something only if unmutated seeds pass all the way.
    feeds = {
        "matmul-add": {"x": RNG.standard_normal((2, 4)).astype(np.float32)},
        "conv-bn": {"x": RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)},
        "if-subgraph": {"cond": np.array(True), "x": RNG.standard_normal((2, 4)).astype(np.float32)},
    }
    feeds["external"] = feeds["matmul-add"]
    assert (seeds["external"] / "in.onnx.data").stat().st_size == (4 * 3 + 3) * 4
    for name, folder in seeds.items():
        expected = run_ort(folder / "in.onnx", feeds[name])
        model = io.load(folder / "in.onnx")
        assert summarize(model).nodes >= 1
        result = graphopt.run_pipeline(model, "fold")
        saved = graphopt.save(result.model, folder.parent / f"{name}-out" / "out.onnx")
        np.testing.assert_allclose(run_ort(saved, feeds[name])[0], expected[0], rtol=1e-5, atol=1e-5)


def _exercise(path: Path) -> str:
    """What ``inspect`` and ``optimize`` do: load, summarize, fold, save, load the result.

    Returns the outcome's name; any exception but a GraphoptError propagates.
    """
    try:
        model = io.load(path)
        summarize(model)
        result = graphopt.run_pipeline(model, "fold")
        io.load(graphopt.save(result.model, path.parent / "out" / "out.onnx"))
    except GraphoptError as exc:
        return type(exc).__name__
    return "ok"


def _mutated_copy(seed_folder: Path, work: Path) -> Path:
    for item in seed_folder.iterdir():
        shutil.copyfile(item, work / item.name)
    return work / "in.onnx"


files = st.sampled_from(sorted(SEEDS)).flatmap(
    lambda name: st.tuples(
        st.just(name), st.sampled_from(["in.onnx", "in.onnx.data"] if SEEDS[name][1] else ["in.onnx"])
    )
)


@MUTATION_SETTINGS
@given(
    target=files,
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
)
def test_flipped_bytes_load_or_fail_cleanly(seeds, target, flips):
    name, file_name = target
    with tempfile.TemporaryDirectory() as work:
        path = _mutated_copy(seeds[name], Path(work))
        victim = Path(work) / file_name
        data = bytearray(victim.read_bytes())
        for where, mask in flips:
            data[int(where * len(data))] ^= mask
        victim.write_bytes(bytes(data))

        event(_exercise(path))


@MUTATION_SETTINGS
@given(target=files, keep=st.floats(0, 1, exclude_max=True))
def test_truncated_files_load_or_fail_cleanly(seeds, target, keep):
    name, file_name = target
    with tempfile.TemporaryDirectory() as work:
        path = _mutated_copy(seeds[name], Path(work))
        victim = Path(work) / file_name
        data = victim.read_bytes()
        victim.write_bytes(data[: int(keep * len(data))])

        outcome = _exercise(path)
        event(outcome)

    # A cut protobuf can still parse when it ends on a field boundary; a cut
    # data file never leaves enough bytes for the tensor.
    if file_name == "in.onnx.data":
        assert outcome == "ModelLoadError"
