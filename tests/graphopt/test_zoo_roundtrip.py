"""Every model_zoo model survives load -> save unchanged, and the first passes keep its outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import LOSSLESS_ATOL, LOSSLESS_RTOL

import graphopt
import model_zoo


def _run(path, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", model_zoo.names())
def test_zoo_model_roundtrips_bit_identical_and_survives_first_passes(name, tmp_path):
    zoo = model_zoo.build(name)
    source = zoo.save(tmp_path / "in")
    expected = _run(source, zoo.feeds)

    model = graphopt.load(source)
    plain = graphopt.save(model, tmp_path / "plain" / f"{name}.onnx")
    result = graphopt.run_pipeline(model, "lift-constants,dce,toposort", check_each_pass=False)
    rewritten = graphopt.save(result.model, tmp_path / "rewritten" / f"{name}.onnx")

    original_header = onnx.load(source, load_external_data=False)
    for path in (plain, rewritten):
        header = onnx.load(path, load_external_data=False)
        assert header.ir_version == original_header.ir_version
        assert list(header.opset_import) == list(original_header.opset_import)
        assert [i.name for i in header.graph.input] == [i.name for i in original_header.graph.input]
        assert [o.name for o in header.graph.output] == [o.name for o in original_header.graph.output]
    assert (plain.parent / f"{name}.onnx.data").exists() == zoo.external_data
    for want, got in zip(expected, _run(plain, zoo.feeds)):
        np.testing.assert_array_equal(got, want)
    for want, got in zip(expected, _run(rewritten, zoo.feeds)):
        np.testing.assert_allclose(got, want, rtol=LOSSLESS_RTOL, atol=LOSSLESS_ATOL)
