"""graphopt.load / graphopt.save / graphopt.to_graphsurgeon."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from helpers import check_full, run_ort

import graphopt
import model_zoo
from graphopt import io
from graphopt.errors import ModelLoadError, ModelSaveError, UnsupportedModelError
from graphopt.runtime import ModelRunner

X = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)


def _proto(weight_rows: int = 8) -> onnx.ModelProto:
    """A Gemm model with a custom-domain opset import, metadata and a producer."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((weight_rows, 8)).astype(np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", weight_rows])],
        [weight],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.example", 2)],
        producer_name="unit-test",
        producer_version="9.9",
    )
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"author": "graphopt tests"})
    return model


def _write(proto: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    onnx.save_model(proto, path, save_as_external_data=external, location=f"{path.name}.weights", size_threshold=0)
    return path


def test_roundtrip_keeps_interface_and_outputs_bit_identical(tmp_path):
    source = _write(_proto(), tmp_path / "in.onnx")

    model = graphopt.load(source)
    out = graphopt.save(model, tmp_path / "out.onnx")

    saved = onnx.load(out)
    assert saved.ir_version == 8
    assert {(o.domain, o.version) for o in saved.opset_import} == {("", 17), ("com.example", 2)}
    assert (saved.producer_name, saved.producer_version) == ("unit-test", "9.9")
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "graphopt tests"}
    assert [i.name for i in saved.graph.input] == ["x"] and [o.name for o in saved.graph.output] == ["y"]
    check_full(out)
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(out, {"x": X})[0])


def test_load_accepts_proto_graphsurgeon_graph_and_ir_model():
    proto = _proto()
    from_proto = graphopt.load(proto)
    from_gs = graphopt.load(gs.import_onnx(proto))

    assert graphopt.load(from_proto) is from_proto
    expected = run_ort(proto, {"x": X})[0]
    for model in (from_proto, from_gs):
        assert [n.op_type for n in model.graph] == ["Gemm"]
        np.testing.assert_array_equal(run_ort(model, {"x": X})[0], expected)


def test_to_graphsurgeon_returns_equivalent_graph(tmp_path):
    source = _write(_proto(), tmp_path / "in.onnx", external=True)
    model = graphopt.load(source)

    graph = graphopt.to_graphsurgeon(model)

    assert isinstance(graph, gs.Graph)
    assert [n.op for n in graph.nodes] == ["Gemm"]
    np.testing.assert_array_equal(graph.tensors()["W"].values, onnx.numpy_helper.to_array(_proto().graph.initializer[0]))


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "not a file"),
        (lambda d: _file(d / "empty.onnx", b""), "not an ONNX model"),
        (lambda d: _file(d / "junk.onnx", b"\xff\x00garbage" * 7), "not a readable ONNX model"),
    ],
    ids=["missing", "directory", "empty", "garbage"],
)
def test_load_reports_bad_files_as_model_load_error(tmp_path, setup, message):
    with pytest.raises(ModelLoadError, match=message):
        graphopt.load(setup(tmp_path))


def test_load_rejects_other_objects():
    with pytest.raises(ModelLoadError, match="cannot load a int"):
        graphopt.load(42)


def test_external_data_stays_memory_mapped_and_is_saved_next_to_output(tmp_path):
    source = _write(_proto(weight_rows=64), tmp_path / "in.onnx", external=True)

    model = graphopt.load(source)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    out = graphopt.save(model, tmp_path / "sub" / "out.onnx")

    assert (tmp_path / "sub" / "out.onnx.data").stat().st_size == 64 * 8 * 4
    location = {e.key: e.value for e in onnx.load(out, load_external_data=False).graph.initializer[0].external_data}
    assert location["location"] == "out.onnx.data"
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(out, {"x": X})[0])


def test_large_weights_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTO_WEIGHT_LIMIT_BYTES", 100)
    model = graphopt.load(_proto(weight_rows=64))

    out = graphopt.save(model, tmp_path / "out.onnx")

    assert (tmp_path / "out.onnx.data").stat().st_size == 64 * 8 * 4
    np.testing.assert_array_equal(run_ort(_proto(weight_rows=64), {"x": X})[0], run_ort(out, {"x": X})[0])


def test_small_model_with_external_data_writes_no_empty_data_file(tmp_path):
    source = _write(_proto(), tmp_path / "in.onnx", external=True)

    out = graphopt.save(graphopt.load(source), tmp_path / "out.onnx")

    assert not (tmp_path / "out.onnx.data").exists()
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(out, {"x": X})[0])


def test_save_refuses_to_overwrite_the_input_model(tmp_path):
    source = _write(_proto(), tmp_path / "in.onnx")
    before = source.read_bytes()

    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        graphopt.save(graphopt.load(source), source)

    assert source.read_bytes() == before


def test_save_refuses_output_whose_data_file_is_the_inputs_external_data(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(_proto(), source, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    data_before = (tmp_path / "out.onnx.data").read_bytes()

    with pytest.raises(ModelSaveError, match="out.onnx.data"):
        graphopt.save(graphopt.load(source), tmp_path / "out.onnx")

    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert not (tmp_path / "out.onnx").exists()


def test_failed_save_leaves_existing_output_and_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous result")
    model = graphopt.load(_proto())

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(ModelSaveError, match="No space left"):
        graphopt.save(model, target)

    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_leaves_no_temp_files_and_model_unchanged(tmp_path):
    model = graphopt.load(_proto())
    before = ir.to_proto(model).SerializeToString()

    graphopt.save(model, tmp_path / "out.onnx")

    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.skipif(shutil.disk_usage("/tmp").free < 12 * 2**30, reason="needs 12 GiB of free disk for a >2 GiB model")
def test_model_over_2gib_loads_memory_mapped_and_saves_with_external_data(tmp_path):
    # Three 768 MiB zero-filled weights in a sparse data file: 2.25 GiB in all,
    # beyond what one protobuf can hold.
    rows = 768 * 2**20 // (4 * 1024)
    nodes, inits = [], []
    offset = 0
    for i in range(3):
        tensor = onnx.TensorProto(name=f"W{i}", data_type=onnx.TensorProto.FLOAT, dims=[rows, 1024])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "big.bin"), ("offset", str(offset)), ("length", str(rows * 1024 * 4))):
            tensor.external_data.add(key=key, value=value)
        offset += rows * 1024 * 4
        inits.append(tensor)
        nodes.append(onnx.helper.make_node("ReduceSum", [f"W{i}"], [f"s{i}"], keepdims=0))
    nodes.append(onnx.helper.make_node("Sum", ["s0", "s1", "s2"], ["y"]))
    graph = onnx.helper.make_graph(nodes, "big", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])], inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with open(tmp_path / "big.bin", "wb") as handle:
        handle.truncate(offset)
    onnx.save(proto, tmp_path / "big.onnx")

    model = graphopt.load(tmp_path / "big.onnx")
    result = graphopt.run_pipeline(model, "lift-constants,dce,toposort")
    out = graphopt.save(result.model, tmp_path / "out" / "big.onnx")

    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert (tmp_path / "out" / "big.onnx.data").stat().st_size == offset
    assert out.stat().st_size < 1_000_000
    onnx.checker.check_model(str(out), full_check=True)


def _same_file_spellings(source: Path) -> dict[str, Path]:
    """Other names for ``source``: a roundabout spelling, a symbolic link and a hard link."""
    (source.parent / "sub").mkdir(exist_ok=True)
    symlink, hardlink = source.parent / "symlink.onnx", source.parent / "hardlink.onnx"
    symlink.symlink_to(source.name)
    os.link(source, hardlink)
    return {"spelling": source.parent / "sub" / ".." / source.name, "symlink": symlink, "hardlink": hardlink}


@pytest.mark.parametrize("alias", ["spelling", "symlink", "hardlink"])
def test_save_refuses_the_input_under_another_name_unless_in_place(tmp_path, alias):
    source = _write(_proto(), tmp_path / "in.onnx")
    before = source.read_bytes()
    target = _same_file_spellings(source)[alias]
    model = graphopt.load(source)

    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        graphopt.save(model, target)
    assert source.read_bytes() == before

    model.metadata_props["written"] = "in place"
    graphopt.save(model, source, in_place=True)
    assert {prop.key: prop.value for prop in onnx.load(source).metadata_props}["written"] == "in place"
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(_proto(), {"x": X})[0])


def test_check_target_fails_fast_on_the_inputs_data_file(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(_proto(weight_rows=64), source, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    model = graphopt.load(source)

    with pytest.raises(ModelSaveError, match="out.onnx.data"):
        io.check_target(model, tmp_path / "out.onnx")
    io.check_target(model, tmp_path / "other.onnx")
    io.check_target(model, tmp_path / "out.onnx", in_place=True)


def test_write_text_atomically_replaces_whole_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    io.write_text_atomically(path, "first\n")
    io.write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n"

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        io.write_text_atomically(path, "third, cut short\n")

    assert path.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["ledger.json"]


@pytest.mark.parametrize("where", ["graph", "function"])
def test_constant_with_external_data_is_read_from_the_models_folder_and_saved_whole(tmp_path, monkeypatch, where):
    # onnx_ir's set_base_dir skips functions (the tensor read its file from the working
    # directory), and its save leaves any tensor attribute pointing at its old file.
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    folder = tmp_path / "model"
    folder.mkdir()
    constant = np.arange(16, dtype=np.float32).reshape(4, 4)
    (folder / "c.bin").write_bytes(constant.tobytes())
    value = TensorProto(name="value", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"")
    set_external_data(value, "c.bin")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    body = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["a", "c"], ["b"])]
    io_values = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 4])], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 4])]
    opsets = [helper.make_opsetid("", 17)]
    if where == "function":
        function = helper.make_function("local", "AddConstant", ["a"], ["b"], body, opsets)
        graph = helper.make_graph([helper.make_node("AddConstant", ["a"], ["b"], domain="local")], "g", *io_values)
        proto = helper.make_model(graph, opset_imports=[*opsets, helper.make_opsetid("local", 1)], functions=[function])
    else:
        proto = helper.make_model(helper.make_graph(body, "g", *io_values), opset_imports=opsets)
    proto.ir_version = 8
    onnx.save(proto, folder / "in.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    model = graphopt.load(folder / "in.onnx")
    saved = graphopt.save(model, tmp_path / "out" / "out.onnx")

    graph = next(iter(model.functions.values())) if where == "function" else model.graph
    attribute = next(node for node in graph if node.op_type == "Constant").attributes["value"].value
    assert isinstance(attribute, ir.ExternalTensor)  # the model keeps reading its own file
    np.testing.assert_array_equal(attribute.numpy(), constant)
    a = np.ones((4, 4), np.float32)
    np.testing.assert_array_equal(run_ort(saved, {"a": a})[0], a + constant)
    with ModelRunner(model) as runner:  # a session opened from bytes has no folder to read c.bin from
        np.testing.assert_array_equal(runner.run({"a": a})["b"], a + constant)


def test_save_does_not_repeat_initializer_types_as_value_info(tmp_path):
    # onnx_ir writes a value_info entry per typed initializer: an unchanged model grew on every save.
    source = model_zoo.build("attention").save(tmp_path / "in")
    model = graphopt.load(source)

    saved = graphopt.save(model, tmp_path / "out" / "out.onnx")

    proto = onnx.load(saved)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    assert not [info.name for info in proto.graph.value_info if info.name in initializers]
    assert saved.stat().st_size <= source.stat().st_size
    assert all(value.type is not None for value in model.graph.initializers.values())  # the model keeps them
    onnx.checker.check_model(proto, full_check=True)


def test_save_without_external_data_embeds_the_weights_the_model_reads_from_its_data_file(tmp_path):
    source = _write(_proto(weight_rows=64), tmp_path / "in.onnx", external=True)
    data_before = (tmp_path / "in.onnx.weights").read_bytes()
    model = graphopt.load(source)

    out = graphopt.save(model, tmp_path / "out" / "inline.onnx", external_data=False)

    assert sorted(p.name for p in out.parent.iterdir()) == ["inline.onnx"]
    saved = onnx.load(out, load_external_data=False)
    assert [t.data_location for t in saved.graph.initializer] == [onnx.TensorProto.DEFAULT]
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(saved, {"x": X})[0])  # from bytes alone
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)  # the model is given back as it was
    assert (tmp_path / "in.onnx.weights").read_bytes() == data_before


def test_save_without_external_data_refuses_weights_over_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTO_WEIGHT_LIMIT_BYTES", 100)

    with pytest.raises(ModelSaveError, match=r"the weights \(2.0 KiB\) do not fit in one .onnx file \(protobuf's 2 GB limit\)"):
        graphopt.save(graphopt.load(_proto(weight_rows=64)), tmp_path / "out.onnx", external_data=False)

    assert os.listdir(tmp_path) == []


def test_check_target_names_the_folder_in_the_way(tmp_path):
    source = _write(_proto(weight_rows=64), tmp_path / "in.onnx", external=True)
    model = graphopt.load(source)
    (tmp_path / "out.onnx.data").mkdir()
    (tmp_path / "dir.onnx").mkdir()

    with pytest.raises(ModelSaveError, match=f"^cannot write {tmp_path / 'out.onnx.data'}: it is a folder$"):
        io.check_target(model, tmp_path / "out.onnx")  # external data, as the input had
    with pytest.raises(ModelSaveError, match=f"^cannot write {tmp_path / 'dir.onnx'}: it is a folder$"):
        io.check_target(model, tmp_path / "dir.onnx", external_data=False)
    io.check_target(model, tmp_path / "out.onnx", external_data=False)  # no data file to write


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_write_text_atomically_gives_new_files_the_mode_open_would(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        io.write_text_atomically(tmp_path / "r.json", "{}\n")
        with open(tmp_path / "plain.json", "w") as handle:  # what the user's other tools write
            handle.write("{}\n")
    finally:
        os.umask(previous)

    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_write_text_atomically_keeps_an_existing_files_mode(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("old\n")
    path.chmod(0o640)

    io.write_text_atomically(path, "new\n")

    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o640


def test_write_text_atomically_raises_model_save_error_naming_the_path(tmp_path):
    (tmp_path / "afile").write_text("x")

    with pytest.raises(ModelSaveError, match=f"^cannot write {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is not a folder$"):
        io.write_text_atomically(tmp_path / "afile" / "r.json", "{}\n")
    with pytest.raises(ModelSaveError, match=f"^cannot write {tmp_path}: it is a folder$"):
        io.write_text_atomically(tmp_path, "{}\n")

    assert sorted(os.listdir(tmp_path)) == ["afile"] and (tmp_path / "afile").read_text() == "x"


def test_an_in_place_save_keeps_the_permissions_of_the_model_and_its_data_file(tmp_path):
    # The replacement was written with the umask's mode: a private 0600 model became 0644.
    source = _write(_proto(weight_rows=64), tmp_path / "in.onnx", external=True)
    data = tmp_path / "in.onnx.weights"
    os.chmod(source, 0o600)
    os.chmod(data, 0o640)
    model = graphopt.load(source)

    graphopt.save(model, source, in_place=True)

    assert stat.S_IMODE(os.stat(source).st_mode) == 0o600 and stat.S_IMODE(os.stat(data).st_mode) == 0o640
    np.testing.assert_array_equal(run_ort(source, {"x": X})[0], run_ort(_proto(weight_rows=64), {"x": X})[0])


def test_a_valid_model_the_ir_cannot_hold_is_unsupported_and_says_why(tmp_path):
    # scikit-learn classifiers end in ZipMap: seq(map(int64, float)), which onnx_ir cannot hold yet.
    h = onnx.helper
    seq_of_maps = h.make_sequence_type_proto(h.make_map_type_proto(onnx.TensorProto.INT64, h.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))
    graph = h.make_graph(
        [h.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        "g",
        [h.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [1, 2])],
        [h.make_value_info("z", seq_of_maps)],
    )
    path = tmp_path / "zipmap.onnx"
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)

    with pytest.raises(UnsupportedModelError, match=r"zipmap.onnx: valid ONNX that graphopt's IR \(onnx_ir .*\) cannot hold yet: Map types"):
        graphopt.load(path)


def test_an_initializer_that_is_a_graph_output_keeps_its_declared_type_through_save(tmp_path):
    # Before: the save hid every initializer's type, graph outputs included, and onnx.checker
    # refused the result ("Field 'type' of 'value_info' is required but missing").
    weight = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [
            onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4]),
            onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4]),
        ],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    check_full(model)
    loaded = graphopt.load(model)

    graphopt.run_pipeline(loaded, "dce")
    graphopt.save(loaded, tmp_path / "out.onnx")

    saved = onnx.load(tmp_path / "out.onnx")
    check_full(saved)
    (declared,) = [output for output in saved.graph.output if output.name == "w"]
    assert declared.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in declared.type.tensor_type.shape.dim] == [4, 4]
