"""xpar's warnings: one line each on rank 0 as they happen, kept to repeat at the end.

A warning that matters (say `optim.warmup_steps >= train.steps`) comes at start-up and
would scroll away under the training lines; the trainer repeats `lines()` after the run.
Python's own format is two lines (file:line, then the source line) per warning; ours is
`xpar: warning: <message>`.

Warnings from other packages are not xpar's to print: they go to the "py.warnings" logger
(the job's log file; the console only with train.verbose=true, see
xpar.train.sinks.quiet), or, verbose, to Python's usual display.

    log = WarningLog(rank=0).install()   # in the entry point, before the config is read
    ...
    log.lines()                          # ["optim.warmup_steps=10 >= ...", ...]
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import TextIO

__all__ = ["PREFIX", "WarningLog", "active"]

PREFIX = "xpar: warning: "
_XPAR_DIR = Path(__file__).resolve().parents[2]  # the xpar package

_active: WarningLog | None = None


def active() -> WarningLog | None:
    """The installed log (None: nothing installed in this process)."""
    return _active


def _is_xpar(category: type, filename: str) -> bool:
    if category.__module__.split(".")[0] == "xpar":
        return True
    try:
        return Path(filename).resolve().is_relative_to(_XPAR_DIR)
    except (OSError, ValueError):
        return False


class WarningLog:
    """Replaces warnings.showwarning while installed. Rank 0 prints; every rank collects."""

    def __init__(self, *, rank: int = 0, verbose: bool = False, stream: TextIO | None = None):
        self.rank = int(rank)
        self.verbose = bool(verbose)
        self._stream = stream
        self._lines: list[str] = []
        self._previous = None

    def install(self) -> WarningLog:
        global _active
        if self._previous is None:
            self._previous = warnings.showwarning
            warnings.showwarning = self.show
        _active = self
        return self

    def uninstall(self) -> None:
        global _active
        if self._previous is not None and warnings.showwarning == self.show:
            warnings.showwarning = self._previous
        self._previous = None
        if _active is self:
            _active = None

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        """warnings.showwarning's signature: xpar's as one line, the others out of the way."""
        if _is_xpar(category, filename):
            text = " ".join(str(message).split())  # one line, whatever the message holds
            if text not in self._lines:
                self._lines.append(text)
            if self.rank == 0:
                stream = self._stream or sys.stderr
                stream.write(PREFIX + text + "\n")
                stream.flush()
        elif self.verbose and self._previous is not None:
            self._previous(message, category, filename, lineno, file, line)
        else:
            logging.getLogger("py.warnings").warning(
                warnings.formatwarning(message, category, filename, lineno, line).rstrip()
            )

    def lines(self) -> list[str]:
        """The distinct xpar warnings so far, in the order first seen."""
        return list(self._lines)
