"""``python -m graphopt``: the same as the ``graphopt`` command."""

from __future__ import annotations

import sys

from graphopt.cli import main

sys.exit(main())
