"""Training: the loop, checkpoints, monitoring, preemption, and the CLI entry point."""


def main() -> None:
    """Console script `xpar-train` (same as `python -m xpar.train`)."""
    from xpar.train.cli import main as _main

    _main()
