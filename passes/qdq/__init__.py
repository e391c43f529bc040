"""``qdq``: calibrated static int8 quantization in QDQ form, and int4 weight-only.

See passes/qdq/quantize.py for the pass and its error model, and
shared/ORT_QDQ.md for the onnxruntime rules the placement follows.
"""

from __future__ import annotations

__all__ = ["QuantizePass", "QuantizationSummary"]

from passes.qdq.quantize import QuantizationSummary, QuantizePass
