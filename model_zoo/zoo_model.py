"""The ``ZooModel`` record: one built model, its sample feeds and how to store it."""

from __future__ import annotations

__all__ = ["ZooModel"]

import logging
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np
import onnx

logger = logging.getLogger(__name__)


# eq=False: field-wise equality would compare dicts of arrays, which raises, and
# would make the record unhashable; identity is the useful notion here.
@dataclass(frozen=True, eq=False)
class ZooModel:
    """A model from the zoo together with one deterministic sample input.

    Attributes:
        name: The zoo name, also the stem of the file ``save`` writes.
        model: The full model; every weight is held in memory.
        feeds: One sample feed dict keyed by graph input name. Only real inputs
            appear, never initializers.
        external_data: Whether ``save`` stores the weights in a separate
            ``<name>.onnx.data`` file next to the model.
    """

    name: str
    model: onnx.ModelProto = field(repr=False)
    feeds: dict[str, np.ndarray] = field(repr=False)
    external_data: bool = False

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        """Write the model to ``<directory>/<name>.onnx``, creating the directory.

        When ``external_data`` is set, every tensor goes to
        ``<name>.onnx.data`` in the same directory and the ``.onnx`` file
        refers to it by that relative location.

        Args:
            directory: Where to write; created with its parents if missing.

        Returns:
            The path of the written ``.onnx`` file.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.onnx"
        if not self.external_data:
            onnx.save_model(self.model, path)
            return path
        location = f"{self.name}.onnx.data"
        # onnx appends to an existing data file, so a second save into the same
        # directory would leave the old bytes in front of the new ones.
        (directory / location).unlink(missing_ok=True)
        # onnx.save_model moves the tensor bytes out of the proto it is given;
        # a copy keeps this (frozen) record's model whole for later use.
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model)
        onnx.save_model(
            proto,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=0,
        )
        logger.debug("saved %s with external data %s", path, location)
        return path
