"""metrics.jsonl: one JSON line per training step, the run's own record of its curve.

The golden tests and the quality benchmark read it back; it is appended line by line (opened
per write) so a run killed mid-way leaves every finished step readable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "MetricsFileSink"]

METRICS_FILE = "metrics.jsonl"


class MetricsFileSink:
    """Appends `json.dumps(row)` lines to `<run_dir>/metrics.jsonl`. Build it on rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILE

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row; keys keep their order."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
