"""graphopt: rewrite and compress ONNX models, with proof they still compute the same.

Typical use::

    import graphopt

    model = graphopt.load("model.onnx")
    result = graphopt.run_pipeline(model, "lift-constants,dce")
    print(result.ledger.to_table())
    graphopt.save(result.model, "model.opt.onnx")
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
    "__version__",
]

from graphopt.io import load, save, to_graphsurgeon
from graphopt.pipeline import PipelineResult, run_pipeline
from graphopt.spec import PassSpec, load_recipe, parse_spec

__version__ = "0.1.0"
