"""Checks of the ``qdq`` options, so that a bad value fails when the pass is built, not midway through a run.

Pipeline specs hand values over as parsed (bool, int, float or string), and
Python callers may pass anything: a string such as ``"no"`` is truthy and
would silently turn a yes/no option on, and ``threads=0`` or ``samples=2.5``
would only fail deep inside onnxruntime or numpy with a traceback.
"""

from __future__ import annotations

__all__ = ["BOOL_OPTIONS", "check_options", "exclude_names"]

from collections.abc import Collection, Mapping
from typing import Any

from passes.options import check_bool, check_names, check_threads, is_int, is_number

BOOL_OPTIONS = ("symmetric", "reduce_range", "weight_only", "bias_correction", "embeddings", "check_speed")


def check_options(options: Mapping[str, Any], choices: Mapping[str, Collection[str]]) -> None:
    """Raises ValueError naming the first option of ``QuantizePass`` whose value it cannot use.

    Args:
        options: The pass's keyword arguments by name.
        choices: For each string option, its allowed values.
    """
    for name in BOOL_OPTIONS:
        check_bool(name, options[name])
    for name, allowed in choices.items():
        if not isinstance(options[name], str) or options[name] not in allowed:
            listed = " or ".join(allowed) if len(allowed) == 2 else f"one of {', '.join(allowed)}"
            raise ValueError(f"{name} must be {listed}, got {options[name]!r}")
    if not is_int(options["weight_bits"]) or options["weight_bits"] not in (4, 8):
        raise ValueError(f"weight_bits must be 8 or 4, got {options['weight_bits']!r}")
    block_size = options["block_size"]
    if not is_int(block_size) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 and at least 16, got {block_size!r}")
    if not is_number(options["percentile"]) or not 0 < options["percentile"] <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {options['percentile']!r}")
    if not is_int(options["samples"]) or options["samples"] < 1:
        raise ValueError(f"samples must be an integer of at least 1, got {options['samples']!r}")
    if not is_int(options["seed"]) or options["seed"] < 0:
        raise ValueError(f"seed must be a non-negative integer, got {options['seed']!r}")
    check_threads(options["threads"])
    cosine = options["target_cosine"]
    if cosine is not None and (not is_number(cosine) or not -1 <= cosine <= 1):
        raise ValueError(f"target_cosine must be in [-1, 1], got {cosine!r}")
    snr = options["target_snr"]
    if snr is not None and not is_number(snr):
        raise ValueError(f"target_snr must be a finite number of dB, got {snr!r}")
    exclude_names(options["exclude"])


def exclude_names(exclude: Any) -> frozenset[str]:
    """The node names or op types in ``exclude``: a comma-separated string, or a list of strings."""
    return check_names("exclude", exclude)
