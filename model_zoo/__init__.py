"""Models with sample feeds for tests, demos and benchmarks, built without network access.

Three families:

* ``TINY``: small hand-built graphs (opset 17), each isolating one pattern a
  rewrite has to handle: dynamic batch, Conv+BatchNormalization, residual Add,
  attention, an If reading outer-scope values, weights held in Constant nodes,
  and a model stored with external data.
* ``REAL``: ImageNet architectures from the onnx package's light backend-test
  files, with their ConstantOfShape placeholder weights replaced by seeded
  random initializers (see ``model_zoo.backend``).
* ``TRAINED``: models with real trained weights committed with the package:
  ``digits_cnn`` (model_zoo.digits). The real text encoder, exported on
  demand with the ``zoo`` extra, is ``model_zoo.real.minilm()``.

Example:
    >>> import model_zoo
    >>> zoo_model = model_zoo.build("mlp", seed=0)
    >>> path = zoo_model.save("/tmp/zoo")  # /tmp/zoo/mlp.onnx
"""

from __future__ import annotations

__all__ = ["ZooModel", "TINY", "REAL", "TRAINED", "names", "build"]

import logging
from collections.abc import Callable

from model_zoo.backend import REAL_BUILDERS
from model_zoo.digits import digits_cnn
from model_zoo.tiny import TINY_BUILDERS
from model_zoo.zoo_model import ZooModel

logger = logging.getLogger(__name__)

TINY: tuple[str, ...] = tuple(TINY_BUILDERS)
REAL: tuple[str, ...] = tuple(REAL_BUILDERS)
_TRAINED_BUILDERS: dict[str, Callable[[int], ZooModel]] = {"digits_cnn": digits_cnn}
TRAINED: tuple[str, ...] = tuple(_TRAINED_BUILDERS)

_BUILDERS: dict[str, Callable[[int], ZooModel]] = {**TINY_BUILDERS, **REAL_BUILDERS, **_TRAINED_BUILDERS}


def names() -> tuple[str, ...]:
    """Every model name: tiny ones, then the backend architectures, then the trained ones."""
    return TINY + REAL + TRAINED


def build(name: str, seed: int = 0) -> ZooModel:
    """Build one zoo model; the same name and seed always give the same bytes.

    Args:
        name: One of ``names()``.
        seed: Seeds ``np.random.default_rng`` for the weights and the feeds.

    Returns:
        The model with its sample feeds.

    Raises:
        ValueError: ``name`` is not a zoo model; the message lists the valid names.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    logger.debug("building %s with seed %d", name, seed)
    return builder(seed)
