"""The machine-and-versions line every bench/ report ends with."""

from __future__ import annotations

__all__ = ["machine_line"]

import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path


def machine_line(packages: Sequence[str]) -> str:
    """CPU model, core count, Python and OS, and the installed version of each package."""
    cpu = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    versions = []
    for package in packages:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return (f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}; " + ", ".join(versions))
