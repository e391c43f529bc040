"""model_zoo.digits: the committed trained CNN is small, accurate, and survives graphopt's fold unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt import load, run_pipeline
from model_zoo import digits

_MODEL_FILE = digits._DATA / digits._MODEL_FILE


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    return digits.test_split()


@pytest.fixture(scope="module")
def proto() -> onnx.ModelProto:
    return digits.digits_cnn().model


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_committed_model_is_small_and_self_contained() -> None:
    assert _MODEL_FILE.stat().st_size < 1_000_000
    model = onnx.load_model_from_string(_MODEL_FILE.read_bytes())
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)


def test_committed_model_keeps_batchnorm_and_its_interface(proto: onnx.ModelProto) -> None:
    assert _ops(proto).count("BatchNormalization") == 3
    assert {"Conv", "Relu", "Gemm"} <= set(_ops(proto))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    (image,) = proto.graph.input
    (logits,) = proto.graph.output
    assert image.name == "image" and logits.name == "logits"
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 8, 8]


def test_test_split_has_expected_shapes_dtypes_and_classes(split: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = split
    assert images.shape == (360, 1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (360,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    # Stratified 20% of 1797 (174 to 183 images a class): 35 to 37 test images each.
    counts = np.bincount(labels)
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37


def test_float_accuracy_is_at_least_095(proto: onnx.ModelProto, split: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = split
    assert digits.accuracy(proto, images, labels) >= 0.95


def test_accuracy_gives_the_same_answer_for_proto_ir_and_path_and_any_batch(
    proto: onnx.ModelProto, split: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = split
    expected = digits.accuracy(proto, images, labels)
    assert digits.accuracy(ir.serde.deserialize_model(proto), images, labels) == expected
    assert digits.accuracy(_MODEL_FILE, images, labels) == expected
    assert digits.accuracy(str(_MODEL_FILE), images, labels, batch=7) == expected


def test_accuracy_raises_when_images_and_labels_differ_in_length(split: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = split
    with pytest.raises(ValueError, match="labels"):
        digits.accuracy(_MODEL_FILE, images, labels[:-1])


def test_digits_cnn_feeds_run_and_are_the_first_test_images(split: tuple[np.ndarray, np.ndarray]) -> None:
    zoo_model = digits.digits_cnn()
    assert zoo_model.name == "digits_cnn" and not zoo_model.external_data
    assert list(zoo_model.feeds) == ["image"]
    np.testing.assert_array_equal(zoo_model.feeds["image"], split[0][:8])
    (logits,) = _session(zoo_model.model).run(["logits"], zoo_model.feeds)
    assert logits.shape == (8, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits.argmax(axis=1), split[1][:8])


def test_fold_removes_batchnorm_and_keeps_accuracy(
    proto: onnx.ModelProto, split: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = split
    original = proto.SerializeToString()  # the pipeline rewrites in place
    result = run_pipeline(load(onnx.load_model_from_string(original)), "fold")
    folded = ir.to_proto(result.model)
    assert "BatchNormalization" not in _ops(folded)
    assert _ops(folded).count("Conv") == 3
    onnx.checker.check_model(folded, full_check=True)
    assert digits.accuracy(folded, images, labels) == digits.accuracy(proto, images, labels)
    expected = _session(proto).run(["logits"], {"image": images})[0]
    actual = _session(folded).run(["logits"], {"image": images})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
