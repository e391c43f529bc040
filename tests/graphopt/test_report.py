"""graphopt.report's human views: the HTML page is real HTML built from the data, with every model string escaped."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np

from graphopt.localize import LayerReport, LayerResult, TensorPair
from graphopt.metrics import Tolerance, compare_arrays
from graphopt.providers import ProviderStatus
from graphopt.report import FidelityReport, ModelFacts

HOSTILE = 'logits<script>alert("x")</script>&amp;|pipe'


class _Page(HTMLParser):
    """Tags in order, the tables as lists of rows of cell text, and the text of <strong> elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.strong: list[str] = []
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
        elif tag == "strong":
            self.strong.append("")

    def handle_endtag(self, tag):
        if tag in self._open:
            self._open.remove(tag)

    def handle_data(self, data):
        if self._open and self._open[-1] in ("td", "th"):
            self.tables[-1][-1][-1] += data
        elif self._open and self._open[-1] == "strong":
            self.strong[-1] += data


def _report() -> FidelityReport:
    tolerance = Tolerance()
    drifted = compare_arrays(HOSTILE, np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.5]]), tolerance)
    reshaped = compare_arrays("aux", np.ones((1, 10)), np.ones((1, 5)), tolerance)
    layer = LayerResult(TensorPair("h<0>", "h<0>", 'node "a" & b', "MatMul"), compare_arrays("h<0>", np.ones(3), np.ones(3) * 2, tolerance))
    facts = ModelFacts("m.onnx", 100, 3, 40)
    return FidelityReport(
        reference=facts,
        candidate=facts,
        tolerance=tolerance,
        data_source="data <dir> & more",
        samples=1,
        seed=0,
        optimization="full",
        providers=[ProviderStatus("cpu", "CPUExecutionProvider", True)],
        outputs=[("cpu", drifted), ("cpu", reshaped)],
        per_layer=LayerReport(provider="cpu", samples=1, layers=[layer]),
    )


def test_html_has_a_heading_a_strong_verdict_and_real_tables_when_the_check_fails():
    page = _Page()
    text = _report().to_html()
    page.feed(text)

    assert text.startswith("<!doctype html>")
    assert "**" not in text and "|---" not in text and "<pre>" not in text  # no Markdown left over
    assert page.tags[:6] == ["html", "head", "meta", "title", "style", "body"] and "h1" in page.tags
    assert page.strong == ["FAIL"]
    outputs, layers = page.tables
    assert outputs[0] == ["provider", "output", "max abs", "rel L2", "cosine", "SNR dB", "top-1", "result"]
    assert outputs[1][:2] == ["cpu", HOSTILE] and outputs[1][2] == "5.000e-01" and outputs[1][7].startswith("FAIL: 1 element beyond")
    assert outputs[2] == ["cpu", "aux", "-", "-", "-", "-", "-", "FAIL: shape (1,5) != reference (1,10)"]
    assert layers[1] == ["h<0>", "MatMul", 'node "a" & b', "1.000e+00", "1.000000", layers[1][5]]
    assert layers[1][5].startswith("FAIL: 3 elements beyond")


def test_html_escapes_every_model_derived_string():
    text = _report().to_html()

    assert "<script>" not in text and 'alert("x")' not in text
    assert "logits&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;amp;|pipe" in text
    assert "h&lt;0&gt;" in text and "node &quot;a&quot; &amp; b" in text and "data &lt;dir&gt; &amp; more" in text


def _ledger_row(name: str, summary: str) -> dict:
    return {"name": name, "options": {}, "seconds": 0.0123, "nodes_before": 9, "nodes_after": 7, "param_bytes_before": 4096,
            "param_bytes_after": 1024, "modified": True, "details": {"summary": summary}}


def test_html_and_markdown_list_what_each_pass_did():
    # The JSON carried the ledger; the pages a person reads said nothing of the passes.
    report = _report()
    report.ledger = [_ledger_row("fold", ""), _ledger_row("qdq", "2 layers <quantized> | 1 float")]

    page = _Page()
    page.feed(report.to_html())
    markdown = report.to_markdown(plot=False)

    passes = page.tables[-1]
    assert passes[0] == ["pass", "changed", "nodes", "params", "time", "summary"]
    assert passes[2] == ["qdq", "yes", "9 -> 7", "4.0 KiB -> 1.0 KiB", "12.3 ms", "2 layers <quantized> | 1 float"]
    assert "## Passes" in markdown and "| qdq | yes | 9 -> 7 |" in markdown and "1 float |" in markdown.replace("\\|", "")
    assert "Passes" not in _report().to_markdown(plot=False)  # validate alone ran no pass


def test_markdown_keeps_its_table_columns_when_a_name_holds_a_pipe():
    lines = _report().to_markdown(plot=False).splitlines()

    row = next(line for line in lines if line.startswith("| cpu | logits"))
    unescaped_pipes = row.replace("\\|", "").count("|")
    assert unescaped_pipes == 9  # 8 cells
    assert "logits\\<script>alert(\"x\")\\</script>&amp;\\|pipe" in row
    assert lines[2] == "**FAIL** against atol=0.0001, rtol=0.001"


def test_per_layer_line_separates_paired_tensors_from_those_with_values_compared():
    tolerance = Tolerance()
    same = LayerResult(TensorPair("a", "a", "n1", "Conv"), compare_arrays("a", np.ones(4), np.ones(4), tolerance))
    pruned = LayerResult(TensorPair("b", "b", "n2", "Conv"), compare_arrays("b", np.ones((1, 8)), np.ones((1, 4)), tolerance))
    report = _report()
    report.per_layer = LayerReport(provider="cpu", samples=1, layers=[same, pruned])

    assert "per-layer: 2 tensors paired, 1 compared, 1 first divergent shown" in report.to_text()
    assert (report.per_layer.to_dict()["paired"], report.per_layer.to_dict()["compared"]) == (2, 1)


def test_bisection_that_found_no_failing_prefix_says_so():
    report = _report()
    report.bisection = {"first_failing_pass": None, "step": None, "checked": 2}

    assert "bisection: none of the 2 replayed prefixes failed" in report.to_text()
    assert "--deterministic" in report.to_text()


def test_integer_outputs_show_the_share_of_equal_values_instead_of_a_cosine():
    labels = np.arange(10)[None, :].repeat(4, axis=0)
    report = _report()
    report.outputs = [("cpu", compare_arrays("label", labels, labels[:, ::-1], Tolerance(min_cosine=0.9)))]

    (row,) = [line for line in report.to_text().splitlines() if line.startswith("cpu ")]
    assert "0.0% equal" in row and "FAIL: 0.0% of values equal < 0.9 required (integer output)" in row
    assert report.to_dict()["outputs"][0]["equal_share"] == 0.0
