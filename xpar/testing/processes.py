"""Run a fresh Python the way a user's shell would, outside any launcher's environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import xpar

REPO = Path(xpar.__file__).resolve().parents[1]
# What torchrun / srun put in a rank's environment: a test process may carry them.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def run_python(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python *args` from the repo root with this checkout's xpar, one BLAS thread, no launcher
    variables; `env` adds or replaces variables. Output is captured as text."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run(
        [sys.executable, *args],
        env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
