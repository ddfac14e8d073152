"""Start-up phases: where the seconds before the first training step go.

`mark(name)` charges the time since the previous mark to `name`; a phase may be charged
more than once (Hydra composes the config before the trainer's imports and validates it
after). The entry point's clock starts when the process started (read from /proc), so the
interpreter's own start-up and every import are counted, not only what runs after it.

One timer per process is current, so any step of the start-up can mark its phase without
the timer being passed down:

    phases.start()                   # the entry point: from the process start
    ...; phases.mark("imports")
    ...; phases.mark("config")
    ...; phases.mark("first step")
    phases.current().line()  -> "start-up: imports 3.1s, config 0.4s, ...; first step ..."
    phases.stop()                    # the run is over: the next one starts its own

`PhaseTimer.write(path)` leaves the same numbers as JSON (with wall-clock times) for
`python -m xpar.bench startup`, which also knows when the launcher started.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = [
    "STARTUP_FILE",
    "PhaseTimer",
    "current",
    "mark",
    "process_start_time",
    "start",
    "stop",
]

STARTUP_FILE = "startup.json"

_current: PhaseTimer | None = None


def process_start_time() -> float | None:
    """This process's start as a time.time() value, from /proc (None where there is none).

    /proc/self/stat field 22 is the start in clock ticks since boot; CLOCK_BOOTTIME is
    now since boot. Their difference is the process's age, good to a tick (10 ms).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        # the command name (field 2) may hold spaces; the fields after its ")" do not
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - max(age, 0.0)


class PhaseTimer:
    """Named durations since a start time (time.time() seconds; None: the process start)."""

    def __init__(self, start: float | None = None) -> None:
        self.origin = "the start"
        if start is None:
            proc = process_start_time()
            self.origin = "process start" if proc is not None else "the entry point"
            start = proc or time.time()
        self.start = start
        self._last = start
        self.phases: dict[str, float] = {}  # name -> seconds, in the order first marked

    def mark(self, name: str) -> float:
        """Charge the time since the previous mark to `name`; returns that time."""
        now = time.time()
        spent = max(now - self._last, 0.0)
        self.phases[name] = self.phases.get(name, 0.0) + spent
        self._last = now
        return spent

    @property
    def elapsed(self) -> float:
        """Seconds from the start to the last mark."""
        return self._last - self.start

    def since_start(self) -> float:
        """Seconds from the start to now (the run's real wall time)."""
        return time.time() - self.start

    def line(self) -> str:
        """`start-up: imports 3.1s, config 0.4s, ...; first step done 6.2s after process start`"""
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.phases.items())
        return f"start-up: {parts}; first step done {self.elapsed:.1f}s after {self.origin}"

    def write(self, path: str | os.PathLike) -> Path:
        """The phases as JSON (seconds, plus the wall-clock start and end) at `path`."""
        path = Path(path)
        path.write_text(
            json.dumps(
                {
                    "start": self.start,
                    "origin": self.origin,
                    "first_step_done": self._last,
                    "phases": self.phases,
                },
                indent=1,
            )
            + "\n"
        )
        return path


def start(at: float | None = None) -> PhaseTimer:
    """A new current timer from `at` (time.time() seconds; None: the process start)."""
    global _current
    _current = PhaseTimer(at)
    return _current


def current() -> PhaseTimer | None:
    """The current timer (None: none started, or stopped)."""
    return _current


def mark(name: str) -> None:
    """Charge the time since the last mark to `name` on the current timer (if any)."""
    if _current is not None:
        _current.mark(name)


def stop() -> None:
    """No current timer: marks until the next start() are dropped."""
    global _current
    _current = None
