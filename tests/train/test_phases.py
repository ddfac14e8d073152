"""Start-up phases: durations charged by name, timed from the process's real start."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from xpar.train import phases
from xpar.train.phases import PhaseTimer, process_start_time


def test_the_process_start_comes_before_the_first_line_of_the_program():
    # a child that sleeps before it asks: its start is at least that long ago
    code = (
        "import time; time.sleep(0.5); t = time.time()\n"
        "from xpar.train.phases import process_start_time\n"
        "print(t - process_start_time())"
    )
    age = float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    assert age >= 0.5 - 0.02  # /proc counts in 10 ms ticks
    assert process_start_time() <= time.time()


def test_marks_charge_the_time_since_the_last_mark_and_add_up():
    t = PhaseTimer(start=time.time() - 2.0)
    assert t.origin == "the start"
    assert t.mark("imports") >= 2.0
    t.mark("config")
    t.mark("imports")  # charged again: Hydra composes between two import steps
    assert list(t.phases) == ["imports", "config"]
    assert t.phases["imports"] >= 2.0
    assert abs(sum(t.phases.values()) - t.elapsed) < 1e-6
    assert t.since_start() >= t.elapsed


def test_line_and_json(tmp_path):
    t = PhaseTimer(start=100.0)
    t.phases, t._last = {"imports": 3.14, "first step": 0.25}, 103.39
    assert (
        t.line() == "start-up: imports 3.1s, first step 0.2s; first step done 3.4s after the start"
    )
    data = json.loads(t.write(tmp_path / "startup.json").read_text())
    assert data == {
        "start": 100.0,
        "origin": "the start",
        "first_step_done": 103.39,
        "phases": {"imports": 3.14, "first step": 0.25},
    }


def test_the_current_timer_from_the_process_start_until_stopped():
    try:
        t = phases.start()
        assert t.origin == "process start" and phases.current() is t
        assert t.start == process_start_time() or abs(t.start - process_start_time()) < 0.05
        phases.mark("imports")
        assert "imports" in t.phases
        phases.stop()
        phases.mark("config")  # no current timer: dropped, not an error
        assert phases.current() is None and "config" not in t.phases
    finally:
        phases.stop()
