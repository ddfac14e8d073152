"""Third-party output off the console unless verbose; xpar's lines on rank 0; errors always."""

from __future__ import annotations

import logging

import pytest

from xpar.train.sinks.quiet import DEEPSPEED_LOGGER, ConsoleFilter, quiet_third_party


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "msg", None, None)


@pytest.mark.parametrize(
    ("name", "level", "verbose", "shown"),
    [
        ("xpar.data.build", logging.INFO, False, True),
        ("compilers.C.base", logging.INFO, False, False),  # setuptools' compiler lines
        ("torch.distributed", logging.WARNING, False, False),
        ("torch.distributed", logging.ERROR, False, True),
        ("compilers.C.base", logging.INFO, True, True),
        ("xparx", logging.INFO, False, False),  # not xpar's
    ],
)
def test_console_filter(name, level, verbose, shown):
    assert ConsoleFilter(verbose=verbose).filter(_record(name, level)) is shown


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record.levelname)


def test_deepspeeds_own_logger_is_quiet_below_error_unless_verbose():
    ds = logging.getLogger(DEEPSPEED_LOGGER)
    keep = _Keep()
    ds.addHandler(keep)
    try:
        quiet_third_party(verbose=False)
        quiet_third_party(verbose=False)  # idempotent: one filter
        ds.warning("Setting accelerator to CPU")
        ds.error("a real problem")
        assert keep.records == ["ERROR"]
        quiet_third_party(verbose=True)
        ds.warning("Setting accelerator to CPU")
        assert keep.records == ["ERROR", "WARNING"]
    finally:
        ds.removeHandler(keep)
        quiet_third_party(verbose=True)
