"""A small CNN trained on scikit-learn's digits data set, with its test split.

Unlike the other zoo models, this one has trained weights and a labelled test
set, so a rewrite can be judged by task accuracy and not only by output
closeness. The model and the data are committed files under
``model_zoo/data``; ``model_zoo/scripts/train_digits_cnn.py`` regenerates
them (it needs torch and scikit-learn, the ``zoo`` extra). This module needs
only numpy, onnx and onnxruntime.

The graph (opset 17, from the TorchScript exporter, BatchNormalization left
in place for graphopt's ``fold`` pass)::

    image [batch, 1, 8, 8] float32, pixel / 16
      Conv(1->16, 3x3, pad 1) -> BatchNormalization -> Relu
      Conv(16->32, 3x3, pad 1) -> BatchNormalization -> Relu -> MaxPool(2x2)
      Conv(32->32, 3x3, pad 1) -> BatchNormalization -> Relu -> Flatten -> Gemm(512->10)
    logits [batch, 10] float32

The test split is the stratified 20% (360 images) of the 1797 digits drawn by
``train_test_split(test_size=0.2, random_state=0, stratify=y)``; the float
model gets 0.9944 of it right.

Example:
    >>> from model_zoo.digits import accuracy, digits_cnn, test_split
    >>> images, labels = test_split()
    >>> accuracy(digits_cnn().model, images, labels)  # 0.9944...
"""

from __future__ import annotations

__all__ = ["digits_cnn", "test_split", "accuracy"]

import importlib.resources
import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

_DATA = importlib.resources.files("model_zoo") / "data"
_MODEL_FILE = "digits_cnn.onnx"
_TEST_FILE = "digits_test.npz"
_SAMPLE_SIZE = 8


def digits_cnn(seed: int = 0) -> ZooModel:
    """Loads the trained digits CNN, with the first test images as its feeds.

    Args:
        seed: Unused; present so the signature matches the other zoo
            builders. The weights are the committed trained ones.

    Returns:
        ``ZooModel("digits_cnn", ...)`` whose feeds are
        ``{"image": images[:8]}`` from the test split.
    """
    del seed  # the weights are trained, not drawn
    model = onnx.load_model_from_string((_DATA / _MODEL_FILE).read_bytes())
    images, _ = test_split()
    return ZooModel("digits_cnn", model, {"image": images[:_SAMPLE_SIZE]})


def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split the model was never trained on.

    Returns:
        ``(images, labels)``: float32 ``[360, 1, 8, 8]`` in ``[0, 1]`` and
        int64 ``[360]`` in ``0..9``.
    """
    with (_DATA / _TEST_FILE).open("rb") as file, np.load(file) as data:
        return data["images"], data["labels"]


# The name starts with "test", so pytest would collect it from any test module
# that imports it by name.
test_split.__test__ = False  # type: ignore[attr-defined]


def accuracy(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    batch: int = 256,
) -> float:
    """Top-1 accuracy of ``model`` on ``images`` through onnxruntime (CPU, one thread).

    Args:
        model: A ModelProto, an onnx_ir Model, or the path of an ``.onnx``
            file. Its first input takes ``[n, 1, 8, 8]`` float32 images and
            its first output gives ``[n, 10]`` scores.
        images: float32 ``[N, 1, 8, 8]``.
        labels: Integer class ids ``[N]``.
        batch: Images per session run.

    Returns:
        The fraction of images whose highest score is at their label.

    Raises:
        ValueError: ``images`` and ``labels`` differ in length, are empty, or
            ``batch`` is not positive.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, and at least one: {len(images)} images, {len(labels)} labels")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    session = _session(model)
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch):
        scores = session.run(None, {input_name: images[start : start + batch]})[0]
        correct += int((scores.argmax(axis=1) == labels[start : start + batch]).sum())
    return correct / len(images)


def _session(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source: str | bytes
    if isinstance(model, ir.Model):
        source = ir.to_proto(model).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
