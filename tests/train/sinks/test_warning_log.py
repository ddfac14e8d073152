"""xpar's warnings as one line each on rank 0, collected; other packages' out of the way."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from xpar.config.store import XparConfigWarning
from xpar.train.sinks import warning_log
from xpar.train.sinks.warning_log import PREFIX, WarningLog


@pytest.fixture
def installed():
    made = []

    def install(**kw):
        log = WarningLog(stream=io.StringIO(), **kw).install()
        made.append(log)
        return log

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield install
        for log in made:
            log.uninstall()


def test_xpar_warnings_are_one_line_each_and_collected_once(installed):
    log = installed(rank=0)
    assert warning_log.active() is log
    for _ in range(2):
        warnings.warn(
            "optim.warmup_steps=10 >= train.steps=6:\n  lower it", XparConfigWarning, stacklevel=1
        )
    line = PREFIX + "optim.warmup_steps=10 >= train.steps=6: lower it\n"
    assert log._stream.getvalue() == line * 2  # shown as Python's filters say; kept once
    assert log.lines() == ["optim.warmup_steps=10 >= train.steps=6: lower it"]


def test_other_ranks_collect_but_print_nothing(installed):
    log = installed(rank=1)
    warnings.warn("from xpar", XparConfigWarning, stacklevel=1)
    assert log._stream.getvalue() == "" and log.lines() == ["from xpar"]


def test_other_packages_warnings_go_to_the_log_not_the_console(installed, caplog):
    log = installed(rank=0)
    with caplog.at_level(logging.WARNING, logger="py.warnings"):
        warnings.warn_explicit("deprecated thing", FutureWarning, "/site-packages/lib.py", 7)
    assert log._stream.getvalue() == "" and log.lines() == []
    assert "lib.py:7: FutureWarning: deprecated thing" in caplog.text


def test_verbose_shows_other_packages_warnings_as_python_does(installed):
    shown = []
    warnings.showwarning = lambda message, category, *a, **k: shown.append((str(message), category))
    log = installed(rank=0, verbose=True)
    warnings.warn_explicit("deprecated thing", FutureWarning, "/site-packages/lib.py", 7)
    assert shown == [("deprecated thing", FutureWarning)]  # the display it replaced
    assert log.lines() == []


def test_uninstall_restores_pythons_display(installed):
    before = warnings.showwarning
    log = installed(rank=0)
    assert warnings.showwarning == log.show
    log.uninstall()
    assert warnings.showwarning is before and warning_log.active() is None
