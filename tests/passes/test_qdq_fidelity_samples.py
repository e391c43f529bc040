"""Which samples qdq's fidelity figures come from when no target is given: unseen ones where calibration can spare them.

The figures once came from the first 4 calibration samples, the very data
the ranges were fitted on (digits_cnn: SNR 44.4 dB in the ledger, 36-42 dB on
unseen samples), while the README promised held-back ones.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from helpers import check_full, parse, to_proto

from graphopt import load, run_pipeline
from passes.qdq import QuantizePass
from passes.qdq.samples import MIN_CALIBRATION, Samples

ROWS, FEATURES, HIDDEN, OUT = 8, 32, 32, 8


def _mlp():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((HIDDEN, OUT)).astype(np.float32) * 0.2
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,{FEATURES}] x) => (float[N,{OUT}] y)
          <float[{FEATURES},{HIDDEN}] w1 = {{{", ".join(map(str, w1.ravel().tolist()))}}},
           float[{HIDDEN},{OUT}] w2 = {{{", ".join(map(str, w2.ravel().tolist()))}}}> {{
          h = MatMul(x, w1)
          r = Relu(h)
          y = MatMul(r, w2)
        }}
    """)


def _feeds(count: int, loud_every_fourth: bool = False) -> list[dict[str, np.ndarray]]:
    """``count`` samples; with ``loud_every_fourth``, samples 3, 7, 11 and 15 (the ones held back) are 8x larger."""
    rng = np.random.default_rng(1)
    feeds = []
    for index in range(count):
        scale = 8.0 if loud_every_fourth and index % 4 == 3 and index < 16 else 1.0
        feeds.append({"x": (scale * rng.standard_normal((ROWS, FEATURES))).astype(np.float32)})
    return feeds


def _cosine_over(original, model, feeds) -> float:
    """Output cosine over all ``feeds`` together (sums of products, as the pass judges)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(to_proto(m).SerializeToString(), options, providers=["CPUExecutionProvider"]) for m in (original, model)]
    want, got = (np.concatenate([s.run(None, f)[0].ravel() for f in feeds]).astype(np.float64) for s in sessions)
    return float(want @ got / np.sqrt((want @ want) * (got @ got)))


def test_real_data_judges_the_result_on_samples_calibration_never_read_when_enough_are_left():
    # The loud samples are the 4 held back, so calibration fits the quiet ones and the loud ones clip.
    feeds = _feeds(MIN_CALIBRATION + 4, loud_every_fourth=True)
    model = _mlp()
    original = to_proto(model)
    pass_ = QuantizePass(data=feeds, calibration="minmax", check_speed=False, bias_correction=False)

    result = run_pipeline(model, [pass_])

    assert result.modified and len(pass_.summary.quantized) == 2
    check_full(model)
    held_back = feeds[3:16:4]
    calibrated = [f for i, f in enumerate(feeds) if not (i % 4 == 3 and i < 16)]
    unseen, seen = _cosine_over(original, model, held_back), _cosine_over(original, model, calibrated)
    fidelity = pass_.summary.fidelity
    assert abs(fidelity["cosine"] - unseen) < 1e-5 and fidelity["samples"] == 4
    assert fidelity["cosine"] < seen - 0.05, (unseen, seen)  # an in-sample figure would hide the clipping
    details = result.ledger.rows[0].details
    assert details["fidelity_samples"] == "held back" and "calibration sample" not in details["summary"]


def test_too_little_real_data_judges_on_calibration_samples_and_says_so():
    feeds = _feeds(MIN_CALIBRATION + 3)  # holding back 4 would leave one too few
    model = _mlp()
    original = to_proto(model)
    pass_ = QuantizePass(data=feeds, calibration="minmax", check_speed=False)

    result = run_pipeline(model, [pass_])

    assert result.modified
    assert abs(pass_.summary.fidelity["cosine"] - _cosine_over(original, model, feeds[:4])) < 1e-5
    details = result.ledger.rows[0].details
    assert details["fidelity_samples"] == "calibration" and details["fidelity"]["samples"] == 4
    assert f"output cosine {pass_.summary.fidelity['cosine']:.5f} on 4 calibration samples" in details["summary"]


def test_samples_judging_without_a_target_are_unseen_by_calibration():
    model = _mlp()
    synthesized = Samples(model, None, count=16, seed=0, hold_back=False, check_unseen=True)
    enough = Samples(model, _feeds(MIN_CALIBRATION + 4), count=0, seed=0, hold_back=False, check_unseen=True)
    few = Samples(model, _feeds(MIN_CALIBRATION + 3), count=0, seed=0, hold_back=False, check_unseen=True)

    # Synthesized: calibration keeps all 16, and the 4 that judge come from a stream of their own.
    calibration = [f["x"] for f in synthesized.calibration()]
    assert len(calibration) == 16 and len(synthesized.held_back) == 4 and synthesized.judged_on == "held back"
    assert not any(np.array_equal(f["x"], c) for f in synthesized.held_back for c in calibration)
    # Real data: every fourth is held back while MIN_CALIBRATION are left, else the first 4 judge.
    assert enough.judged_on == "held back" and len(enough.held_back) == 4 and len(list(enough.calibration())) == MIN_CALIBRATION
    assert few.judged_on == "calibration" and len(few.held_back) == 4 and len(list(few.calibration())) == MIN_CALIBRATION + 3
    # prune and lowrank never ask: their calibration keeps every sample.
    plain = Samples(model, _feeds(16), count=0, seed=0, hold_back=False)
    assert len(list(plain.calibration())) == 16


def test_synthesized_calibration_reports_held_back_figures():
    model = load(to_proto(_mlp()))
    pass_ = QuantizePass(samples=8, check_speed=False)

    result = run_pipeline(model, [pass_])

    details = result.ledger.rows[0].details
    assert details["fidelity_samples"] == "held back" and details["fidelity"]["samples"] == 4
    assert details["fidelity"]["cosine"] > 0.99
