"""model_zoo: every model is valid, runs to sane numbers, and builds the same bytes from the same seed."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import model_zoo
from model_zoo.backend import load_light
from model_zoo.calibrate import calibrate_batch_norm

REPO_ROOT = Path(__file__).resolve().parents[2]


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # The light ResNet-50 and ZFNet keep an unused initializer that onnxruntime warns about.
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outputs: list[np.ndarray] = _session(model).run(None, feeds)
    return outputs


@pytest.fixture(scope="module", params=model_zoo.names())
def zoo(request: pytest.FixtureRequest) -> Iterator[model_zoo.ZooModel]:
    """Each model built once per module; pytest groups the tests by model, so only one is alive at a time."""
    yield model_zoo.build(request.param)


def test_names_are_tiny_then_real_when_listed() -> None:
    assert model_zoo.TINY == (
        "mlp",
        "cnn_bn",
        "mobilenet",
        "residual",
        "attention",
        "if_outer_scope",
        "constant_weights",
        "external_data",
    )
    assert model_zoo.REAL == (
        "resnet50",
        "densenet121",
        "inception_v1",
        "inception_v2",
        "squeezenet",
        "shufflenet",
        "vgg19",
        "alexnet",
        "zfnet512",
    )
    assert model_zoo.TRAINED == ("digits_cnn",)
    assert model_zoo.names() == model_zoo.TINY + model_zoo.REAL + model_zoo.TRAINED


def test_model_passes_full_check_when_built(zoo: model_zoo.ZooModel) -> None:
    onnx.checker.check_model(zoo.model, full_check=True)


def test_feeds_cover_exactly_the_real_inputs_when_built(zoo: model_zoo.ZooModel) -> None:
    graph = zoo.model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    assert list(zoo.feeds) == [value.name for value in inputs]
    for value in inputs:
        feed = zoo.feeds[value.name]
        assert feed.dtype == onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        declared = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        assert len(declared) == feed.ndim
        assert all(want in (None, got) for want, got in zip(declared, feed.shape, strict=True))


def test_outputs_are_finite_and_vary_when_run_on_feeds(zoo: model_zoo.ZooModel) -> None:
    outputs = _run(zoo.model, zoo.feeds)
    assert len(outputs) == len(zoo.model.graph.output)
    for output in outputs:
        assert np.isfinite(output).all()
        assert output.size > 1 and float(np.var(output)) > 0.0
        # Sane scale: nothing exploded on the way (softmax outputs are <= 1 anyway).
        assert float(np.abs(output).max()) < 1e3


def _assert_materialized(light: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """No ConstantOfShape or shape tensor left; ir_version 4 with only the image as graph input; opset kept."""
    graph = model.graph
    assert not [node for node in graph.node if node.op_type == "ConstantOfShape"]
    assert model.ir_version == 4 and light.ir_version == 3
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in light.opset_import]
    assert model.producer_name == light.producer_name
    light_initializers = {tensor.name for tensor in light.graph.initializer}
    data_inputs = [value for value in light.graph.input if value.name not in light_initializers]
    assert list(graph.input) == data_inputs
    shape_tensors = {node.input[0] for node in light.graph.node if node.op_type == "ConstantOfShape"}
    assert not shape_tensors & {tensor.name for tensor in graph.initializer}


@pytest.mark.parametrize("zoo", model_zoo.REAL, indirect=True)
def test_real_weights_are_random_and_role_scaled_when_built(zoo: model_zoo.ZooModel) -> None:
    light = load_light(zoo.name)
    _assert_materialized(light, zoo.model)
    weights = {tensor.name: tensor for tensor in zoo.model.graph.initializer}
    materialized = [node.output[0] for node in light.graph.node if node.op_type == "ConstantOfShape"]
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = defaultdict(list)
    for name in materialized:
        array = numpy_helper.to_array(weights[name])
        if array.size > 1:
            assert float(array.std()) > 0.0, f"{name} is constant"
        by_shape[array.shape].append(array)
    same_shape = next(arrays for arrays in by_shape.values() if len(arrays) >= 2)
    assert not np.array_equal(same_shape[0], same_shape[1])
    _assert_role_scales(zoo.model)


def _assert_role_scales(model: onnx.ModelProto) -> None:
    """Conv weights are He-normal by fan-in; BatchNormalization variances are positive."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            weight = numpy_helper.to_array(weights[node.input[1]])
            if weight.size >= 1000:
                he_std = np.sqrt(2.0 / np.prod(weight.shape[1:]))
                assert abs(float(weight.std()) / he_std - 1.0) < 0.1, node.input[1]
        if node.op_type == "BatchNormalization" and node.input[4] in weights:
            assert (numpy_helper.to_array(weights[node.input[4]]) > 0).all()


@pytest.mark.parametrize("name", [*model_zoo.TINY, "squeezenet"])
def test_build_is_deterministic_when_seed_repeats(name: str) -> None:
    first, second = model_zoo.build(name, seed=3), model_zoo.build(name, seed=3)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.feeds.keys() == second.feeds.keys()
    for key in first.feeds:
        np.testing.assert_array_equal(first.feeds[key], second.feeds[key])
    assert model_zoo.build(name, seed=4).model.SerializeToString() != first.model.SerializeToString()


def test_build_raises_listing_valid_names_when_name_is_unknown() -> None:
    with pytest.raises(ValueError, match="valid names: .*mlp.*resnet50"):
        model_zoo.build("resnet51")


def test_save_writes_data_file_that_reloads_when_external_data(tmp_path: Path) -> None:
    zoo_model = model_zoo.build("external_data")
    assert zoo_model.external_data
    expected = _run(zoo_model.model, zoo_model.feeds)
    path = zoo_model.save(tmp_path / "nested" / "dir")
    data = path.with_name("external_data.onnx.data")
    assert path == tmp_path / "nested" / "dir" / "external_data.onnx"
    assert data.stat().st_size > path.stat().st_size
    # A second save must not append to the data file, nor have emptied the in-memory model.
    size = data.stat().st_size
    assert zoo_model.save(path.parent) == path and data.stat().st_size == size
    assert all(tensor.raw_data for tensor in zoo_model.model.graph.initializer)
    reloaded = onnx.load(path)
    onnx.checker.check_model(path, full_check=True)
    for got, want in zip(_run(reloaded, zoo_model.feeds), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_run(path, zoo_model.feeds)[0], expected[0])


def test_save_writes_one_file_when_weights_are_inline(tmp_path: Path) -> None:
    path = model_zoo.build("mlp").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    assert onnx.load(path).SerializeToString() == model_zoo.build("mlp").model.SerializeToString()


def test_mlp_batch_is_symbolic_when_built() -> None:
    zoo_model = model_zoo.build("mlp")
    batch = zoo_model.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    assert zoo_model.feeds["x"].shape == (2, 64)
    assert _run(zoo_model.model, zoo_model.feeds)[0].shape == (2, 10)


def test_if_branches_read_outer_scope_when_built() -> None:
    zoo_model = model_zoo.build("if_outer_scope")
    graph = zoo_model.model.graph
    cond = graph.input[1].type.tensor_type
    assert cond.elem_type == onnx.TensorProto.BOOL and cond.HasField("shape") and len(cond.shape.dim) == 0
    (if_node,) = [node for node in graph.node if node.op_type == "If"]
    branches = {attribute.name: attribute.g for attribute in if_node.attribute}
    assert not branches["then_branch"].input and not branches["else_branch"].input
    assert {"h", "W1"} <= {name for node in branches["then_branch"].node for name in node.input}
    assert {"h", "b1"} <= {name for node in branches["else_branch"].node for name in node.input}
    then_out = _run(zoo_model.model, zoo_model.feeds)[0]
    else_out = _run(zoo_model.model, {**zoo_model.feeds, "cond": np.array(False)})[0]
    assert (then_out >= 0).all() and ((else_out > 0) & (else_out < 1)).all()


def test_constant_weights_has_no_initializers_when_built() -> None:
    graph = model_zoo.build("constant_weights").model.graph
    assert not graph.initializer
    constants = [node for node in graph.node if node.op_type == "Constant"]
    assert len(constants) == 5 and all(node.attribute[0].name == "value" for node in constants)


def test_batch_norm_outputs_are_normalized_when_calibrated() -> None:
    zoo_model = model_zoo.build("cnn_bn")
    model = zoo_model.model
    assert calibrate_batch_norm(model, zoo_model.feeds) == 2
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    model.graph.output.append(onnx.ValueInfoProto(name=bn.output[0]))
    normalized = _run(model, zoo_model.feeds)[-1]
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    np.testing.assert_allclose(normalized.mean(axis=(0, 2, 3)), weights[bn.input[2]], atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=(0, 2, 3)), np.abs(weights[bn.input[1]]), rtol=1e-3)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_zoo", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_saves_and_lists_when_name_is_known(tmp_path: Path) -> None:
    saved = _cli("save", "mlp", str(tmp_path))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == str(tmp_path / "mlp.onnx")
    onnx.checker.check_model(tmp_path / "mlp.onnx", full_check=True)
    listed = _cli("list")
    assert listed.returncode == 0 and tuple(listed.stdout.split()) == model_zoo.names()


def test_cli_exits_2_with_one_line_when_name_is_unknown(tmp_path: Path) -> None:
    result = _cli("save", "nope", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "valid names" in result.stderr
    assert not list(tmp_path.iterdir())
