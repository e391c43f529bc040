"""The pass ledger: rows as strict JSON, in the --ledger file and inside the fidelity report."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from graphopt import pipeline
from graphopt.cli import main
from graphopt.ledger import LedgerRow

_AWKWARD = {
    "fidelity": {"cosine": 1.0, "snr_db": math.inf, "snr_db_lower_bound": -math.inf, "spread": math.nan},
    "ranks": [(4, np.float32(0.25)), (8, np.float64(math.inf))],
    "count": np.int64(3),
}


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as strict JSON readers (and other languages) do."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_rows_with_nonfinite_and_numpy_values_are_strict_json():
    row = LedgerRow("qdq", {}, 0.1, 3, 5, 100, 40, True, details=_AWKWARD)

    got = _strict(json.dumps(row.to_dict(), allow_nan=False))

    assert got["details"]["fidelity"] == {"cosine": 1.0, "snr_db": "inf", "snr_db_lower_bound": "-inf", "spread": "nan"}
    assert got["details"]["ranks"] == [[4, 0.25], [8, "inf"]] and got["details"]["count"] == 3


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    text = '<ir_version: 8, opset_import: ["" : 17]> g (float[2,4] x) => (float[2,4] y) { n = Neg(x) \n y = Identity(n) }'
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_cli_writes_the_ledger_and_report_when_a_pass_reports_an_infinite_snr(model_path, tmp_path, monkeypatch, capsys):
    # Seen on light_bvlc_alexnet with fold,qdq: an exact held-back SNR (inf) made --report crash with a traceback.
    monkeypatch.setattr(pipeline, "_details", lambda pass_: dict(_AWKWARD))
    ledger, report = tmp_path / "ledger.json", tmp_path / "report.json"

    code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes", "fold", "--validate", "cpu",
                 "--report", str(report), "--ledger", str(ledger)])

    assert code == 0, capsys.readouterr().err
    assert _strict(ledger.read_text())[0]["details"]["fidelity"]["snr_db"] == "inf"
    assert _strict(report.read_text())["ledger"][0]["details"]["fidelity"]["snr_db"] == "inf"
