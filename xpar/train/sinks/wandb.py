"""The W&B sink: one run on rank 0, offline by default (nothing leaves the machine).

The offline run lands in `<run_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb` and can be
uploaded later with `wandb sync`. A run id passed back in (from the checkpoint) resumes the same
run (`resume="allow"`), so one W&B run spans restarts. online mode falls back to offline when
W&B cannot be reached, rather than stopping the training.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xpar.config.schema import LoggerConfig
from xpar.redact import looks_like_secret
from xpar.train.wandb_reader import has_exit_record

__all__ = ["WandbSink"]


class WandbSink:
    """An open W&B run. Build it on rank 0 only, with a config already redacted."""

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        run_dir: Path,
        config: Mapping[str, Any],
        run_id: str | None,
        quiet: bool = False,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=cfg.project or None,
            entity=cfg.entity or None,
            name=cfg.run_name or None,
            id=run_id,  # None: wandb makes one; we read it back below
            resume="allow",
            dir=str(run_dir),
            config=dict(config),
            reinit="create_new",  # our own handle, no global run to clobber
        )
        self._run: Any = _init(cfg.wandb_mode, kwargs, quiet)
        self.run_id: str = self._run.id
        self.dir = Path(self._run.settings.sync_dir)
        self.url: str | None = (
            getattr(self._run, "url", None) if cfg.wandb_mode == "online" else None
        )

    def log(
        self, metrics: Mapping[str, Any], step: int, hists: Mapping[str, list[float]] | None = None
    ) -> None:
        """Log scalars, and expert-load histograms (tokens per expert), at `step`."""
        payload = dict(metrics)
        payload.update({k: histogram(v) for k, v in (hists or {}).items()})
        self._run.log(payload, step=int(step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log a PNG file as a W&B image at `step`."""
        import wandb

        self._run.log({key: wandb.Image(str(path))}, step=int(step))

    def describe(self) -> str:
        """The summary line: where the run is and how to upload it."""
        if self.url:
            return f"wandb run: {self.url} (files in {self.dir})"
        return f"wandb run: {self.dir} (offline, id {self.run_id}; upload with `wandb sync {self.dir}`)"

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent) and wait until its file on disk is complete."""
        if self._run is None:
            return
        sync_file = Path(self._run.settings.sync_file)
        self._run.finish(exit_code=exit_code)
        self._run = None
        # wandb-core writes the .wandb file after finish() returns; wait for the
        # closing record so a reader (or a copy of run_dir) sees the whole run.
        if not _wait_for_exit_record(sync_file, timeout_s=60.0):
            warnings.warn(f"W&B run file {sync_file} still incomplete after 60s", stacklevel=3)


def _init(mode: str, kwargs: dict[str, Any], quiet: bool) -> Any:
    import wandb

    settings = {"silent": True} if quiet else {}
    if any(looks_like_secret(a) for a in sys.argv):
        # W&B's metadata records the command line; a secret given there must not be saved
        settings["x_disable_meta"] = True
    if settings:
        kwargs = {**kwargs, "settings": wandb.Settings(**settings)}
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as exc:  # no network / no key: keep training, log offline
        if mode != "online":
            raise
        warnings.warn(
            f"logger.wandb_mode='online' failed ({type(exc).__name__}: {exc}); "
            "logging offline instead (upload later with `wandb sync`)",
            stacklevel=4,
        )
        return wandb.init(mode="offline", **kwargs)


def histogram(counts: list[float]) -> Any:
    """Tokens per expert as a W&B histogram: one bin per expert (height = its tokens)."""
    import numpy as np
    import wandb

    counts_e = np.asarray(counts, dtype=np.float64)
    if len(counts_e) <= 512:  # W&B's bin limit: one bin per expert, height = tokens
        return wandb.Histogram(np_histogram=(counts_e, np.arange(len(counts_e) + 1)))
    return wandb.Histogram(np_histogram=np.histogram(counts_e, bins=64))


def _wait_for_exit_record(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    last_size = -1
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        # parse only once the size has settled: the file can be large after a long run
        if size == last_size and size > 7 and has_exit_record(path):
            return True
        last_size = size
        time.sleep(0.05)
    return False
