"""Hostile and broken model files: graphopt.load and the CLI fail cleanly, read nothing they should not.

Every case builds its model in tmp_path. The layout for external data is::

    tmp_path/secret.bin          a file outside the model's folder, big enough for W
    tmp_path/pkg/model/in.onnx   the model; W (4x4 float) is external data
    tmp_path/pkg/model/w.bin     W's data when the location is the honest one
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, run_ort
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

import graphopt
from graphopt import io, untrusted
from graphopt.cli import main
from graphopt.errors import (
    GraphoptError,
    InvalidModelError,
    ModelLoadError,
    UnsafeModelError,
    UnsupportedModelError,
)

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
W = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)

# --- recording which files are opened ----------------------------------------

_opened: list[str] | None = None
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    # Python raises the "open" audit event for open(), io.open and os.open,
    # which is how onnx reads the model and onnx_ir maps external data.
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


@contextmanager
def _recording_opens() -> Iterator[list[str]]:
    """Collects the resolved paths opened inside the block.

    Audit hooks cannot be removed, so the one hook idles outside the block.
    """
    global _opened, _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


# --- model builders ------------------------------------------------------------


def _vi(name: str, shape: list | None = None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape if shape is not None else ["N", 4])


def _model(nodes, inputs, outputs, initializers=(), functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    return model


def _matmul(weight: TensorProto) -> onnx.ModelProto:
    """y = MatMul(x, W)."""
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x")], [_vi("y")], [weight])


def _external(name: str, location: str, **where: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"")
    set_external_data(tensor, location, **where)  # onnx's helper insists on a raw_data field to move out
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pkg" / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret.bin").write_bytes(np.full(64, 7.0, np.float32).tobytes())
    return folder


def _save(proto: onnx.ModelProto, folder: Path) -> Path:
    # Plain bytes: onnx.save would try to write or resolve the external data itself.
    path = folder / "in.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def _with_location(location: str, data: bytes | None = W.tobytes(), **where: int) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        folder = _folder(tmp_path)
        if data is not None:
            (folder / "w.bin").write_bytes(data)
        return _save(_matmul(_external("W", location, **where)), folder)

    return build


def _symlink_out(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    return _save(_matmul(_external("W", "link.bin")), folder)


def _absolute(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    return _save(_matmul(_external("W", str(tmp_path / "secret.bin"))), folder)


def _directory(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    (folder / "weights").mkdir()
    return _save(_matmul(_external("W", "weights")), folder)


def _fifo(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    os.mkfifo(folder / "w.bin")  # opening it for reading would block forever
    return _save(_matmul(_external("W", "w.bin")), folder)


def _hard_link(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    os.link(tmp_path / "secret.bin", folder / "w.bin")
    return _save(_matmul(_external("W", "w.bin")), folder)


def _function_constant_outside(tmp_path: Path) -> Path:
    """A Constant inside a model-local function reading ``secret.bin``, which lies in the working directory, not beside the model.

    onnx_ir's set_base_dir skips functions, which left it reading from the
    working directory; graphopt points it at the model's folder, where there is no such file.
    """
    folder = _folder(tmp_path)
    value = _external("value", "secret.bin")
    function = helper.make_function(
        "local",
        "AddSecret",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["a", "c"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    proto = _model(
        [helper.make_node("AddSecret", ["x"], ["y"], domain="local")],
        [_vi("x", [4, 4])],
        [_vi("y", [4, 4])],
        functions=[function],
    )
    return _save(proto, folder)


def _subgraph_initializer_outside(tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    proto = _if_model(then_initializers=[_external("W", "../../secret.bin")], then_reads="W")
    return _save(proto, folder)


def _if_model(*, then_initializers=(), then_reads: str = "x", else_reads: str = "x") -> onnx.ModelProto:
    """y = If(cond) then Neg(then_reads) else Relu(else_reads); the branches may read outer values."""
    then_branch = helper.make_graph(
        [helper.make_node("Neg", [then_reads], ["t"])], "then", [], [_vi("t", [4, 4])], list(then_initializers)
    )
    else_branch = helper.make_graph([helper.make_node("Relu", [else_reads], ["e"])], "else", [], [_vi("e", [4, 4])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)
    return _model([node], [_vi("cond", [], TensorProto.BOOL), _vi("x", [4, 4])], [_vi("y", [4, 4])])


EXTERNAL_CASES: dict[str, tuple[Callable[[Path], Path], type[GraphoptError], str]] = {
    "dotdot": (_with_location("../../secret.bin"), UnsafeModelError, "outside the model's folder"),
    "dotdot-via-subdir": (_with_location("sub/../../../secret.bin"), UnsafeModelError, "outside the model's folder"),
    "absolute": (_absolute, UnsafeModelError, "must be relative"),
    "symlink-out": (_symlink_out, UnsafeModelError, "outside the model's folder"),
    "nul": (_with_location("w.bin\0../../secret.bin"), UnsafeModelError, "NUL"),
    "directory": (_directory, UnsafeModelError, "not a regular file"),
    "fifo": (_fifo, UnsafeModelError, "not a regular file"),
    "hard-link": (_hard_link, UnsafeModelError, "hard links"),
    "function-constant": (_function_constant_outside, ModelLoadError, "not found"),
    "subgraph-initializer": (_subgraph_initializer_outside, UnsafeModelError, "outside the model's folder"),
    "missing": (_with_location("w.bin", data=None), ModelLoadError, "not found"),
    "short-file": (_with_location("w.bin", data=W.tobytes()[:40]), ModelLoadError, "has 40 bytes, too few for 64"),
    "offset-past-end": (
        _with_location("w.bin", offset=32, length=64),
        ModelLoadError,
        "too few for 64 bytes at offset 32",
    ),
    "length-not-size": (_with_location("w.bin", length=32), InvalidModelError, "length 32 but dims"),
    # onnx's ExternalDataInfo refuses it inside onnx_ir's deserializer; with
    # untrusted.check_proto wired into io.py it becomes an InvalidModelError.
    "negative-offset": (_with_location("w.bin", offset=-4), GraphoptError, ""),
}


@pytest.mark.parametrize("case", EXTERNAL_CASES, ids=list(EXTERNAL_CASES))
def test_external_data_is_rejected_at_load_without_opening_outside_files(tmp_path, monkeypatch, case):
    build, error, message = EXTERNAL_CASES[case]
    path = build(tmp_path)
    monkeypatch.chdir(tmp_path)  # where an unanchored location would otherwise resolve
    secret = os.path.realpath(tmp_path / "secret.bin")

    with _recording_opens() as opened, pytest.raises(error, match=re.escape(message) if message else None):
        graphopt.load(path)

    assert secret not in opened
    assert os.path.realpath(path) in opened  # the recorder works: the model itself was read


@pytest.mark.parametrize("location", ["../../secret.bin", "link.bin"])
def test_bare_model_file_name_gets_the_same_containment(tmp_path, monkeypatch, location):
    # With no folder in the path, onnx_ir leaves base_dir empty and skips its own check.
    folder = _folder(tmp_path)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    _save(_matmul(_external("W", location)), folder)
    monkeypatch.chdir(folder)

    with _recording_opens() as opened, pytest.raises(UnsafeModelError, match="outside the model's folder"):
        graphopt.load("in.onnx")

    assert os.path.realpath(tmp_path / "secret.bin") not in opened


def test_external_data_inside_the_folder_loads_and_computes(tmp_path):
    folder = _folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(b"\0" * 8 + W.tobytes())
    (folder / "alias.bin").symlink_to(folder / "sub" / "w.bin")  # a symlink that stays inside is fine
    weight = _external("W", "alias.bin", offset=8, length=64)

    model = graphopt.load(_save(_matmul(weight), folder))

    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), W)
    saved = graphopt.save(model, tmp_path / "out" / "out.onnx")  # onnxruntime needs a folder for external data
    assert_same_outputs([X @ W], run_ort(saved, {"x": X}), rtol=1e-6, atol=1e-6)


def test_external_data_in_a_model_without_folder_is_refused():
    with pytest.raises(UnsafeModelError, match="has no folder"):
        graphopt.load(_matmul(_external("W", "w.bin")))


# --- files that are not ONNX ---------------------------------------------------


def _valid_bytes() -> bytes:
    return _matmul(onnx.numpy_helper.from_array(W, "W")).SerializeToString()


def _npz(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, x=X)


FILE_CASES: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(_valid_bytes()[: len(_valid_bytes()) // 2]),
    "text": lambda p: p.write_text("graph g { y = MatMul(x, W) }\n"),
    "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "npz": _npz,
    "fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("case", FILE_CASES, ids=list(FILE_CASES))
def test_files_that_are_not_onnx_fail_with_model_load_error(tmp_path, case):
    path = tmp_path / "in.onnx"
    FILE_CASES[case](path)

    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        graphopt.load(path)


def test_file_over_the_protobuf_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "in.onnx"
    with open(path, "wb") as handle:
        handle.truncate(2**31)  # sparse: no disk used

    with _recording_opens() as opened, pytest.raises(ModelLoadError, match="over protobuf's 2 GiB limit"):
        graphopt.load(path)

    assert os.path.realpath(path) not in opened


# --- tensors whose data disagrees with their dims -------------------------------


def _raw(name: str, dims: list[int], data: bytes, dtype: int = TensorProto.FLOAT) -> TensorProto:
    return TensorProto(name=name, data_type=dtype, dims=dims, raw_data=data)


def _typed(name: str, dims: list[int], **fields: list) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    for field, values in fields.items():
        getattr(tensor, field).extend(values)
    return tensor


def _constant_model(value: TensorProto) -> onnx.ModelProto:
    nodes = [helper.make_node("Constant", [], ["W"], value=value), helper.make_node("MatMul", ["x", "W"], ["y"])]
    return _model(nodes, [_vi("x")], [_vi("y")])


TENSOR_CASES: dict[str, tuple[onnx.ModelProto, str]] = {
    "raw-short": (_matmul(_raw("W", [4, 4], W.tobytes()[:60])), "call for 64 bytes but 60 are stored"),
    "raw-long": (_matmul(_raw("W", [4, 4], W.tobytes() + b"\0")), "call for 64 bytes but 65 are stored"),
    "absurd-dims": (_matmul(_raw("W", [2**40, 2**40], W.tobytes())), f"call for {2**80 * 4} bytes"),
    "absurd-dims-no-data": (
        _matmul(TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40, 2**40])),
        "float_data entries but 0",
    ),
    "negative-dims": (_matmul(_raw("W", [-4, -4], W.tobytes())), "invalid dims [-4, -4]"),
    "typed-count": (_matmul(_typed("W", [4, 4], float_data=[1.0] * 15)), "call for 16 float_data entries but 15"),
    "wrong-field": (_matmul(_typed("W", [4, 4], int64_data=[1] * 16)), "cannot store data in int64_data"),
    "two-fields": (_matmul(_typed("W", [4, 4], float_data=[1.0] * 16)), "has raw_data and float_data"),
    "constant-value": (
        _constant_model(_raw("value", [4, 4], W.tobytes()[:8])),
        "'Constant.value': dims [4, 4] call for 64",
    ),
    "constant-dtype": (_constant_model(_raw("value", [4, 4], W.tobytes(), dtype=999)), "unknown data type"),
    "subgraph-initializer": (
        _if_model(then_initializers=[_raw("W", [4, 4], b"")], then_reads="W"),
        "'W': dims [4, 4] call for 64",
    ),
}
# protobuf's raw_data is bytes, not a repeated field; set it after the typed data.
TENSOR_CASES["two-fields"][0].graph.initializer[0].raw_data = W.tobytes()


@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_tensor_data_that_disagrees_with_dims_is_invalid(case):
    proto, message = TENSOR_CASES[case]

    with pytest.raises(InvalidModelError, match=re.escape(message)):
        graphopt.load(proto)


def test_packed_and_typed_tensors_of_the_right_size_load():
    int4 = helper.make_tensor("q", TensorProto.INT4, [3], [1, -2, 3])  # 2 packed entries for 3 values
    complex64 = helper.make_tensor("c", TensorProto.COMPLEX64, [2], [1 + 2j, 3 - 4j])  # 4 float_data entries
    text = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"])
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in ("q", "c", "s")]
    outputs = [
        _vi("q_out", [3], TensorProto.INT4),
        _vi("c_out", [2], TensorProto.COMPLEX64),
        _vi("s_out", [2], TensorProto.STRING),
    ]
    proto = _model(nodes, [], outputs, [int4, complex64, text])
    proto.ir_version = 10
    proto.opset_import[0].version = 21

    model = graphopt.load(proto)

    values = {name: model.graph.initializers[name].const_value.numpy() for name in ("q", "c", "s")}
    np.testing.assert_array_equal(values["q"].astype(np.int8), [1, -2, 3])
    np.testing.assert_array_equal(values["c"], np.array([1 + 2j, 3 - 4j], np.complex64))
    assert values["s"].tolist() == [b"a", b"b"]


# --- graphs that break ONNX's structural rules -----------------------------------


def _graph(nodes, inputs=("x",), outputs=("y",), initializers=()) -> onnx.ModelProto:
    return _model(nodes, [_vi(name) for name in inputs], [_vi(name) for name in outputs], initializers)


def _if_cycle() -> onnx.ModelProto:
    """y = If(cond) then Neg(d) else Relu(x); d = Neg(y): the cycle runs through the then-branch."""
    proto = _if_model(then_reads="d")
    proto.graph.node.append(helper.make_node("Neg", ["y"], ["d"]))
    return proto


GRAPH_CASES: dict[str, tuple[onnx.ModelProto, str]] = {
    "cycle": (
        _graph(
            [
                helper.make_node("Add", ["x", "b"], ["a"]),
                helper.make_node("Relu", ["a"], ["b"]),
                helper.make_node("Neg", ["b"], ["y"]),
            ]
        ),
        r"cycle through value '[ab]'",
    ),
    "self-loop": (_graph([helper.make_node("Add", ["x", "y"], ["y"])]), "cycle through value 'y'"),
    "cycle-through-subgraph": (_if_cycle(), "cycle through value '[yd]'"),
    "dangling-input": (_graph([helper.make_node("Add", ["x", "ghost"], ["y"])]), "reads 'ghost', which no node"),
    "dangling-in-subgraph": (_if_model(else_reads="ghost"), "reads 'ghost', which no node"),
    "unproduced-output": (_graph([helper.make_node("Relu", ["x"], ["z"])]), "output 'y' is not produced"),
    "duplicate-input": (_graph([helper.make_node("Relu", ["x"], ["y"])], inputs=("x", "x")), "'x' is defined twice"),
}


@pytest.mark.parametrize("case", GRAPH_CASES, ids=list(GRAPH_CASES))
def test_broken_graph_structure_is_invalid_and_names_the_value(case):
    proto, message = GRAPH_CASES[case]

    with pytest.raises(InvalidModelError, match=message):
        graphopt.load(proto)


def _reparsed(proto: onnx.ModelProto, old: bytes, new: bytes) -> onnx.ModelProto:
    """The proto with bytes replaced in its serialized form, as a corrupt file would give it."""
    data = proto.SerializeToString()
    assert data.count(old) == 1
    return onnx.ModelProto.FromString(data.replace(old, new))


def _conv(**attributes) -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "K")
    node = helper.make_node("Conv", ["x", "K"], ["y"], **attributes)
    return _model([node], [_vi("x", [1, 1, 3, 3])], [_vi("y", [1, 2, 3, 3])], [weight])


def _conv_with_doc() -> onnx.ModelProto:
    proto = _conv(pads=[0, 0, 0, 0])
    proto.graph.node[0].attribute[0].doc_string = "about-pads"
    return proto


SCHEMA_CASES: dict[str, tuple[onnx.ModelProto, str]] = {
    "op-type-not-utf8": (
        _reparsed(_graph([helper.make_node("Relu", ["x"], ["y"])]), b"Relu", b"R\xfflu"),
        "not valid UTF-8",
    ),
    "attribute-doc-not-utf8": (_reparsed(_conv_with_doc(), b"about-pads", b"about-p\xe9ds"), "not valid UTF-8"),
    "too-few-inputs": (_graph([helper.make_node("MatMul", ["x"], ["y"])]), "1 inputs and 1 outputs do not fit"),
    "too-many-outputs": (
        _graph([helper.make_node("Relu", ["x"], ["y", "z"])], outputs=("y", "z")),
        "1 inputs and 2 outputs",
    ),
    "attribute-wrong-type": (_conv(pads=1.0), "attribute 'pads' is unknown, untyped or of the wrong type"),
    "attribute-unknown": (_conv(padz=[0, 0, 0, 0]), "attribute 'padz' is unknown"),
    "attribute-without-type": (
        _reparsed(_conv(group=1), b"\xa0\x01\x02", b"\xa0\x01\x00"),
        "attribute 'group' is unknown, untyped",
    ),
}


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=list(SCHEMA_CASES))
def test_nodes_that_break_their_schema_or_utf8_are_invalid(case):
    proto, message = SCHEMA_CASES[case]

    with pytest.raises(InvalidModelError, match=re.escape(message)):
        graphopt.load(proto)


def test_custom_domain_nodes_are_not_checked_against_any_schema():
    node = helper.make_node("Fancy", ["x"], ["y", "z"], domain="com.example", anything=1.5)
    proto = _graph([node], outputs=("y", "z"))
    proto.opset_import.append(helper.make_opsetid("com.example", 1))

    model = graphopt.load(proto)

    assert [(n.domain, n.op_type, len(n.outputs)) for n in model.graph] == [("com.example", "Fancy", 2)]


DUPLICATE_CASES: dict[str, tuple[onnx.ModelProto, str]] = {
    "two-node-outputs": (
        _graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]),
        "value 'y' is defined twice",
    ),
    "initializer-and-output": (
        _graph(
            [helper.make_node("Relu", ["x"], ["W"]), helper.make_node("Add", ["x", "W"], ["y"])],
            initializers=[onnx.numpy_helper.from_array(W, "W")],
        ),
        "value 'W' is defined twice",
    ),
    "two-initializers": (
        _graph([helper.make_node("Add", ["x", "W"], ["y"])], initializers=[onnx.numpy_helper.from_array(W, "W")] * 2),
        "initializer 'W' is defined twice",
    ),
}


@pytest.mark.parametrize("case", DUPLICATE_CASES, ids=list(DUPLICATE_CASES))
def test_check_proto_names_values_defined_twice(case):
    proto, message = DUPLICATE_CASES[case]

    with pytest.raises(InvalidModelError, match=message):
        untrusted.check_proto(proto)


@pytest.mark.parametrize("case", ["two-node-outputs", "initializer-and-output"])
def test_load_rejects_values_defined_twice(case):
    # onnx_ir's deserializer already refuses these; io.py reports it as a load error.
    with pytest.raises(GraphoptError):
        graphopt.load(DUPLICATE_CASES[case][0])


@pytest.mark.parametrize("case", DUPLICATE_CASES, ids=list(DUPLICATE_CASES))
def test_load_names_values_defined_twice(case):
    proto, message = DUPLICATE_CASES[case]

    with pytest.raises(InvalidModelError, match=message):
        graphopt.load(proto)


@pytest.mark.parametrize(("where", "message"), [({"offset": -4}, "offset '-4'"), ({"length": -1}, "length '-1'")])
def test_check_proto_refuses_negative_external_offsets(where, message):
    proto = _if_model(then_initializers=[_external("W", "w.bin", **where)], then_reads="W")

    with pytest.raises(InvalidModelError, match=re.escape(message)):
        untrusted.check_proto(proto)


def test_check_proto_refuses_sparse_initializers_that_onnx_ir_drops():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("S", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("i", TensorProto.INT64, [1], [0]),
        [4],
    )
    proto = _graph([helper.make_node("Add", ["x", "S"], ["y"])])
    proto.graph.sparse_initializer.append(sparse)

    with pytest.raises(UnsupportedModelError, match="sparse initializer 'S'"):
        untrusted.check_proto(proto)


def test_check_proto_accepts_an_initializer_that_defaults_an_input():
    proto = _graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        inputs=("x", "W"),
        initializers=[onnx.numpy_helper.from_array(W, "W")],
    )

    untrusted.check_proto(proto)

    assert [n.op_type for n in graphopt.load(proto).graph] == ["Add"]


@pytest.mark.parametrize("branch", ["then", "else"])
def test_subgraphs_reading_outer_values_load_and_compute(branch):
    proto = _if_model(then_reads="x", else_reads="x")
    feeds = {"cond": np.array(branch == "then"), "x": X[:1].repeat(4, 0)}

    model = graphopt.load(proto)

    assert [n.op_type for n in model.graph] == ["If"]
    assert_same_outputs(run_ort(proto, feeds), run_ort(model, feeds))
    want = -feeds["x"] if branch == "then" else np.maximum(feeds["x"], 0)
    np.testing.assert_array_equal(run_ort(model, feeds)[0], want)


def test_nodes_out_of_order_are_not_a_cycle():
    proto = _graph([helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])])

    model = graphopt.load(proto)

    assert [n.op_type for n in model.graph] == ["Neg", "Relu"]


def _chain(length: int) -> ir.Model:
    """x -> Add(x, x) -> Relu -> Relu ... -> y, built with onnx_ir directly (faster than a proto)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    nodes = [ir.Node("", "Add", [x, x], name="n0")]
    for index in range(1, length):
        nodes.append(ir.Node("", "Relu", [nodes[-1].outputs[0]], name=f"n{index}"))
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, name="chain", opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def test_100k_node_chain_passes_and_a_cycle_closing_it_is_found():
    # Timing is in the report rather than asserted: a shared CI machine makes
    # wall-clock bounds flaky. Both checks are linear; a quadratic one would
    # not finish a 100k chain in reasonable time.
    model = _chain(100_000)
    untrusted.check_model(model, None)

    model.graph.node(0).replace_input_with(1, model.graph.outputs[0])  # n0 now reads the last Relu

    with pytest.raises(InvalidModelError, match=r"cycle through value"):
        untrusted.check_model(model, None)


# --- the command line ------------------------------------------------------------


def _written_by(write: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        write(tmp_path / "in.onnx")
        return tmp_path / "in.onnx"

    return build


CLI_CASES: dict[str, Callable[[Path], Path]] = {
    **{f"external-{name}": build for name, (build, _, _) in EXTERNAL_CASES.items()},
    **{f"file-{name}": _written_by(build) for name, build in FILE_CASES.items()},
    "tensor-absurd-dims": lambda t: _save(TENSOR_CASES["absurd-dims"][0], t),
    "graph-cycle": lambda t: _save(GRAPH_CASES["cycle"][0], t),
    "graph-dangling": lambda t: _save(GRAPH_CASES["dangling-input"][0], t),
    "graph-two-node-outputs": lambda t: _save(DUPLICATE_CASES["two-node-outputs"][0], t),
}


@pytest.mark.parametrize("command", ["inspect", "optimize"])
@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_cli_reports_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, case, command):
    path = CLI_CASES[case](tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "out.onnx"
    argv = ["inspect", str(path)] if command == "inspect" else ["optimize", str(path), "-o", str(out)]

    code = _run_with_deadline(lambda: main(argv), seconds=60)

    captured = capsys.readouterr()
    assert code == 2
    assert re.fullmatch(r"graphopt: error: [^\n]+\n", captured.err), captured.err
    assert not out.parent.exists()


def _run_with_deadline(call: Callable[[], int], *, seconds: float) -> int:
    """Runs ``call`` in a daemon thread so that a hang fails the test instead of the whole run."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # re-raised in the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {time.monotonic() - start:.0f} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_graphopt_load_is_io_load():
    # The cases above go through graphopt.load; the CLI goes through io.load.
    assert graphopt.load is io.load
