"""Shared pytest set-up: makes tests/helpers.py importable from every test folder, and bounds hypothesis.

Hypothesis profiles (pick one with the environment variable HYPOTHESIS_PROFILE):

- ``ci`` (default): few examples, drawn from a fixed seed so every run checks
  the same graphs, no example database, no deadline (onnxruntime session
  start-up times vary on shared machines);
- ``dev``: many more random examples, for hunting bugs locally.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
