"""graphopt: rewrite and compress ONNX models, with proof they still compute the same.

Typical use::

    import graphopt

    model = graphopt.load("model.onnx")
    result = graphopt.run_pipeline(model, "lift-constants,dce")
    print(result.ledger.to_table())
    graphopt.save(result.model, "model.opt.onnx")
    report = graphopt.validate("model.onnx", "model.opt.onnx", per_layer=True)
    print(report.to_text())
"""

from __future__ import annotations

__all__ = [
    "load",
    "save",
    "to_graphsurgeon",
    "run_pipeline",
    "PipelineResult",
    "PassSpec",
    "parse_spec",
    "load_recipe",
    "validate",
    "FidelityReport",
    "Tolerance",
    "__version__",
]

from graphopt.io import load, save, to_graphsurgeon
from graphopt.metrics import Tolerance
from graphopt.pipeline import PipelineResult, run_pipeline
from graphopt.report import FidelityReport
from graphopt.spec import PassSpec, load_recipe, parse_spec

# Must stay the last import: the function shadows the graphopt.validate module
# attribute, so that graphopt.validate(...) is the call users expect.
from graphopt.validate import validate

__version__ = "0.1.0"
