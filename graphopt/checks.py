"""Model validity checks: onnx.checker (full) plus opening an onnxruntime session.

Used by ``--check-each-pass``. The model is written to a scratch folder first,
with external data when large, so that models over 2 GB are checked by path.
"""

from __future__ import annotations

__all__ = ["check_model"]

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt import io
from graphopt.errors import first_line


def check_model(model: ir.Model) -> None:
    """Raises ``ValueError`` naming the first problem found; returns None if valid.

    onnxruntime opens the model with graph optimizations disabled, so the check
    costs a session creation (kernel lookup, type checks) and no rewriting.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-check-") as scratch:
        path = io.save(model, Path(scratch) / "model.onnx")
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # the checker raises several unrelated types
            raise ValueError(f"onnx.checker: {first_line(exc)}") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception hierarchy
            raise ValueError(f"onnxruntime: {first_line(exc)}") from exc

