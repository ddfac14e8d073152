"""Third-party output stays off the console unless `train.verbose=true`.

Rank 0 prints xpar's lines; other ranks only xpar's warnings and anyone's errors (the
console handler's level, conf/hydra/job_logging/xpar.yaml). Where each library's output
goes instead:

- Python logging (Hydra's job logging, setuptools' compiler lines, wandb, torch):
  `ConsoleFilter` on the console handler passes xpar's own loggers and errors; everything
  still goes to the job's log file in out_dir.
- DeepSpeed logs through its own "DeepSpeed" logger with its own stdout handler (the
  "Setting accelerator to CPU" warning at import, the engine's notes): `quiet_third_party`
  puts a filter on that logger before deepspeed is imported.
- Python warnings from other packages (torch.distributed's among them): to the log file,
  by xpar.train.sinks.warning_log.
- wandb's banner and end-of-run summary: `silent` in xpar.train.sinks.wandb.
"""

from __future__ import annotations

import logging

__all__ = ["ConsoleFilter", "quiet_third_party"]

DEEPSPEED_LOGGER = "DeepSpeed"


def _is_xpar(name: str) -> bool:
    return name == "xpar" or name.startswith("xpar.")


class ConsoleFilter(logging.Filter):
    """What the console handler shows: everything when verbose; else xpar's own records and
    errors from anyone (the log file keeps the rest). The handler's level does the ranks."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = bool(verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.ERROR or _is_xpar(record.name)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_DEEPSPEED_QUIET = _BelowError()


def quiet_third_party(verbose: bool) -> None:
    """Quiet (or, verbose, leave alone) the loggers that bypass the console handler.

    Call before deepspeed is imported: its accelerator warning comes at import time. The
    filter sits on the logger itself, which DeepSpeed configures later but never clears.
    """
    ds = logging.getLogger(DEEPSPEED_LOGGER)
    ds.removeFilter(_DEEPSPEED_QUIET)
    if not verbose:
        ds.addFilter(_DEEPSPEED_QUIET)
