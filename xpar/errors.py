"""Errors that xpar raises on purpose."""


class XparConfigError(ValueError):
    """A user mistake in configuration: the message names field, value and fix."""


class XparDistributedError(RuntimeError):
    """Ranks disagree about something they must agree on."""


class XparUnhealthyError(RuntimeError):
    """Training cannot go on without damage (e.g. non-finite weights about to be saved)."""
