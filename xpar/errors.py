"""Errors that xpar raises on purpose."""


class XparConfigError(ValueError):
    """A user mistake in configuration: the message names field, value and fix."""


class XparDistributedError(RuntimeError):
    """Ranks disagree about something they must agree on."""
