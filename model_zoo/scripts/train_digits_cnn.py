"""Regenerates ``model_zoo/data/digits_cnn.onnx`` and ``model_zoo/data/digits_test.npz``.

Trains a small CNN on scikit-learn's bundled digits data set (1797 images of
8x8 pixels, 10 classes; it ships inside the scikit-learn package, so nothing
is downloaded) and exports it to ONNX with its BatchNormalization nodes kept,
so that graphopt's ``fold`` pass has real work to do on a model with a real
accuracy.

Needs torch and scikit-learn (the ``zoo`` extra) plus onnx and onnxruntime.
Run it from the repository root::

    python3 -m venv /tmp/digits-venv
    /tmp/digits-venv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    /tmp/digits-venv/bin/python model_zoo/scripts/train_digits_cnn.py

The graph (opset 17, input ``image`` float32 [batch, 1, 8, 8] holding
pixel / 16, output ``logits`` float32 [batch, 10])::

    Conv(1->16, 3x3, pad 1) -> BatchNormalization -> Relu
    Conv(16->32, 3x3, pad 1) -> BatchNormalization -> Relu -> MaxPool(2x2)
    Conv(32->32, 3x3, pad 1) -> BatchNormalization -> Relu -> Flatten -> Gemm(512->10)

The split (``train_test_split(test_size=0.2, random_state=0, stratify=y)``),
the weight init and the batch order are all seeded and torch runs with
deterministic algorithms on one thread, so a rerun on the same torch build
gives the same weights.

The export uses the TorchScript exporter (``dynamo=False``). The dynamo
exporter with its default ``optimize=True`` folds every BatchNormalization
into the Conv before it, which defeats the point; with ``optimize=False`` it
keeps them but leaves Shape/Squeeze/Reshape/Concat shape arithmetic for the
flatten and goes through the onnx version converter to reach opset 17.

The test split (images and labels) is written next to
the model; the training split is not, as it is only needed to retrain.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

_SEED = 0
_OPSET = 17
_DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data"


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU blocks, one 2x2 max pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(image), 1))


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=_SEED, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def _train(x_train: np.ndarray, y_train: np.ndarray, epochs: int) -> DigitsCNN:
    torch.manual_seed(_SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(_SEED)
    batch = 64
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        scheduler.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x):.4f}")
    return model.eval()


def _torch_accuracy(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    return float((predicted == labels).mean())


def _export(model: DigitsCNN) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it is the one that keeps
        # BatchNormalization (see the module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            buffer,
            dynamo=False,
            opset_version=_OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    # The exporter leaves the default domain unset; onnx.helper and onnx_ir
    # write it as an explicit "". Set here, so a load/save round trip is byte-identical.
    for opset in proto.opset_import:
        opset.domain = opset.domain
    return proto


def _onnx_accuracy(proto: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images})[0]
    return float((logits.argmax(1) == labels).mean()), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=pathlib.Path, default=_DATA_DIR)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = _split()
    model = _train(x_train, y_train, args.epochs)
    print(f"torch train accuracy {_torch_accuracy(model, x_train, y_train):.4f}")
    print(f"torch test accuracy  {_torch_accuracy(model, x_test, y_test):.4f}")

    proto = _export(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    if "BatchNormalization" not in ops:
        raise RuntimeError(f"the export folded BatchNormalization away: {ops}")
    train_accuracy, _ = _onnx_accuracy(proto, x_train, y_train)
    test_accuracy, logits = _onnx_accuracy(proto, x_test, y_test)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    print(f"onnx vs torch max abs logit difference {np.abs(logits - expected).max():.2e}")
    print(f"onnx train accuracy {train_accuracy:.4f}")
    print(f"onnx test accuracy  {test_accuracy:.4f}")
    if test_accuracy < 0.95:
        raise RuntimeError(f"test accuracy {test_accuracy:.4f} is below 0.95")

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "digits_cnn.onnx"
    onnx.save_model(proto, model_path)
    np.savez_compressed(args.out / "digits_test.npz", images=x_test, labels=y_test)
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes): {len(ops)} nodes {ops}")


if __name__ == "__main__":
    main()
