"""Exception types that graphopt raises for bad input.

The command line turns every :class:`GraphoptError` into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "ModelSaveError",
    "UnsafeModelError",
    "UnsupportedModelError",
    "PipelineSpecError",
    "PassCheckError",
    "InvalidModelError",
    "DataError",
    "ModelRunError",
    "first_line",
]


class GraphoptError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ModelLoadError(GraphoptError):
    """The model file or object cannot be read as ONNX."""


class UnsafeModelError(ModelLoadError):
    """The model asks for something graphopt refuses to do, e.g. read outside its folder."""


class UnsupportedModelError(GraphoptError):
    """The model is valid ONNX but needs more than graphopt or the installed onnxruntime supports.

    For example an operator onnxruntime lacks, or sparse initializers, which onnx_ir drops.
    """


class ModelSaveError(GraphoptError):
    """The model cannot be written where it was asked to go."""


class PipelineSpecError(GraphoptError):
    """A pipeline spec string or recipe names an unknown pass or option."""


class InvalidModelError(GraphoptError):
    """The model parses but breaks an ONNX rule a pass relies on, e.g. a cycle."""


class PassCheckError(GraphoptError):
    """A pass produced a model that onnx.checker or onnxruntime rejects."""


class DataError(GraphoptError):
    """Feeds or data files do not match the model."""


class ModelRunError(GraphoptError):
    """onnxruntime rejected the feeds of a model it had opened, or failed while running it (a kernel error)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
